"""User Datasets / DataLoaders become pqd data, with clear errors for what cannot."""

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from pqd.compress.qat import to_torchscript
from pqd.compress.student import Student, convert_student
from pqd.config import TrainConfig
from pqd.data import batches
from pqd.data.adapters import as_dataset, as_splits
from pqd.errors import DataError
from pqd.integrations import evaluation
from pqd.models.registry import create_model
from pqd.stages.prune import PruneConfig, prune
from pqd.stages.quantize import QuantizeConfig, quantize
from pqd.train import train


def _pair(n=64, float_images=True):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 16, 16), generator=g, dtype=torch.uint8)
    y = torch.arange(n) % 4
    return (x.float() / 255 if float_images else x), y, x


def test_float_dataloader_round_trips_to_uint8():
    xf, y, x8 = _pair()
    ds = as_dataset(DataLoader(TensorDataset(xf, y), batch_size=10))
    assert ds.x.dtype == torch.uint8 and torch.equal(ds.x, x8) and torch.equal(ds.y, y)
    assert ds.classes == ("0", "1", "2", "3")


def test_map_style_dataset_of_uint8_samples_and_normalised_floats():
    xf, y, x8 = _pair()

    class Samples(Dataset):
        classes = ["a", "b", "c", "d"]

        def __len__(self):
            return len(y)

        def __getitem__(self, i):
            return x8[i], int(y[i])

    ds = as_dataset(Samples())
    assert torch.equal(ds.x, x8) and ds.classes == ("a", "b", "c", "d")
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    normed = (xf - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with pytest.raises(DataError, match="normalized_with"):
        as_dataset(TensorDataset(normed, y))
    assert torch.equal(as_dataset(TensorDataset(normed, y), normalized_with=(mean, std)).x, x8)


@pytest.mark.parametrize(
    "bad, match",
    [
        (3, "cannot read images"),
        (TensorDataset(torch.rand(8, 3, 16, 16), torch.rand(8)), "integer class indices"),
        (TensorDataset(torch.rand(8, 16, 16), torch.zeros(8, dtype=torch.long)), r"\[N, C, H, W\]"),
        ([], "no images"),
    ],
)
def test_clear_errors(bad, match):
    with pytest.raises(DataError, match=match):
        as_dataset(bad)


def test_stage_accepts_a_dataloader():
    """Before: AttributeError: 'DataLoader' object has no attribute 'train'."""
    xf, y, _ = _pair(96)
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=4, width=0.125)
    out = prune(
        Student(model),
        PruneConfig(sparsity=0.5),
        data=DataLoader(TensorDataset(xf, y), batch_size=32),
        epochs=1,
        train_config=TrainConfig(batch_size=32, progress=False),
    )
    assert out.masks
    splits = as_splits(TensorDataset(xf, y), test=(xf[:8], y[:8]))
    assert len(splits.train) == 96 and len(splits.test) == 8 and splits.num_classes == 4


class _Recorder(torch.nn.Module):
    """A small classifier that keeps every training batch it sees."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3, padding=1),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
            torch.nn.Linear(4, 4),
        )
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        if self.training:
            self.seen.append(x.detach().clone())
        return self.net(x)


def _distance_to_nearest(batch: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    return torch.cdist(batch.flatten(1), images.flatten(1), compute_mode="donot_use_mm_for_euclid_dist").min(1).values


def test_a_user_loader_reaches_the_model_unchanged_and_unaugmented():
    """Neither normalised behind the user's back nor flipped or cropped unless asked."""
    xf, y, _ = _pair(64)
    xf[:, :, :, :8] = 0.0  # left half dark: a horizontal flip or a shifted crop changes the image
    model = _Recorder()
    train(
        model,
        as_splits(DataLoader(TensorDataset(xf, y), batch_size=16)),
        epochs=2,
        lr=0.01,
        config=TrainConfig(batch_size=16, progress=False),
    )
    seen = torch.cat(model.seen)
    assert len(seen) >= 64
    assert float(_distance_to_nearest(seen, xf).max()) < 1e-4


def test_augmentation_of_a_user_loader_is_opt_in():
    xf, y, _ = _pair(64)
    xf[:, :, :, :8] = 0.0
    splits = as_splits(TensorDataset(xf, y), augment=True, hflip=True)
    assert splits.augment and splits.hflip
    model = _Recorder()
    train(model, splits, epochs=1, lr=0.01, config=TrainConfig(batch_size=16, progress=False))
    assert float(_distance_to_nearest(torch.cat(model.seen), xf).max()) > 1e-2


def test_a_model_trained_on_a_user_loader_is_evaluated_on_it_as_it_comes():
    """The stage functions, convert and to_torchscript give a model that takes the loader's own batches."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(128) % 4
    colours = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]])[y].view(-1, 3, 1, 1)
    x = ((colours * 0.6 + torch.rand(128, 3, 16, 16, generator=g) * 0.4) * 255).round() / 255
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    cfg = TrainConfig(batch_size=32, progress=False)
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=4, width=0.125)
    train(model, as_splits(loader), epochs=3, lr=0.05, config=cfg)
    student = quantize(Student(model), QuantizeConfig(lr=0.005), data=loader, epochs=1, train_config=cfg)
    deployed = to_torchscript(convert_student(student), torch.zeros(1, 3, 16, 16))
    # pqd's own view of the same images: its batches are what the model was trained on
    splits = as_splits(loader)
    ours = torch.cat([deployed(xb) for xb, _ in batches(splits.train, batch_size=32, mean=splits.mean, std=splits.std)])
    logits, labels = evaluation.predict(deployed, loader)
    assert torch.allclose(logits, ours, atol=1e-5) and torch.equal(labels, y)
    assert evaluation.evaluate(deployed, loader)["top1"] > 0.5  # chance: 0.25
