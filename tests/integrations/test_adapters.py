"""User Datasets / DataLoaders become pqd data, with clear errors for what cannot."""

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from pqd.compress.student import Student
from pqd.config import TrainConfig
from pqd.data.adapters import as_dataset, as_splits
from pqd.errors import DataError
from pqd.models.registry import create_model
from pqd.stages.prune import PruneConfig, prune


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


@pytest.mark.parametrize("bad, match", [
    (3, "cannot read images"),
    (TensorDataset(torch.rand(8, 3, 16, 16), torch.rand(8)), "integer class indices"),
    (TensorDataset(torch.rand(8, 16, 16), torch.zeros(8, dtype=torch.long)), r"\[N, C, H, W\]"),
    ([], "no images"),
])
def test_clear_errors(bad, match):
    with pytest.raises(DataError, match=match):
        as_dataset(bad)


def test_stage_accepts_a_dataloader():
    """Before: AttributeError: 'DataLoader' object has no attribute 'train'."""
    xf, y, _ = _pair(96)
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=4, width=0.125)
    out = prune(Student(model), PruneConfig(sparsity=0.5), data=DataLoader(TensorDataset(xf, y), batch_size=32), epochs=1,
                train_config=TrainConfig(batch_size=32, progress=False))
    assert out.masks
    splits = as_splits(TensorDataset(xf, y), test=(xf[:8], y[:8]))
    assert len(splits.train) == 96 and len(splits.test) == 8 and splits.num_classes == 4
