"""Image folders of mixed sizes and modes at data.image_size: one evaluation preprocessing on every
path (in memory, streamed, pqd predict, the deployable file), streaming == in memory."""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pqd.commands.predict import load_deployable, load_image, predict_files
from pqd.config import DataConfig
from pqd.data import FileDataset, batches, load_data
from pqd.deploy.deployable import deployable_meta, deployable_torchscript, save_torchscript
from pqd.errors import ConfigError, DataError

_spec = importlib.util.spec_from_file_location("mixedfolder", Path(__file__).with_name("mixedfolder.py"))
mixedfolder = importlib.util.module_from_spec(_spec)
sys.modules["mixedfolder"] = mixedfolder
_spec.loader.exec_module(mixedfolder)


@pytest.fixture
def folder(tmp_path) -> tuple[Path, list[Path]]:
    root = tmp_path / "imgs"
    return root, mixedfolder.write_mixed_folder(root, n_train=8, n_test=4)


def _cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(dataset="folder", root=str(root), image_size=24, workers=0, **kw)


def test_mixed_sizes_without_image_size_name_the_key(folder, cache_dir):
    with pytest.raises(DataError, match="data.image_size"):
        load_data(DataConfig(dataset="folder", root=str(folder[0]), cache_dir=cache_dir))


def test_mixed_sizes_and_modes_load_at_image_size(folder):
    data = load_data(_cfg(folder[0]))
    assert (
        data.image_shape == (3, 24, 24)
        and data.train.x.shape == (24, 3, 24, 24)
        and data.test.x.shape == (12, 3, 24, 24)
    )
    assert data.preprocess == {"resize_shorter": 27, "center_crop": 24, "interpolation": "bilinear", "mode": "RGB"}
    assert data.crop_scale == (0.08, 1.0)
    grey = [i for i, p in enumerate(folder[1]) if p.suffix == ".png" and _mode(p) == "L"]
    assert grey and all(torch.equal(data.test.x[i, 0], data.test.x[i, 1]) for i in grey)  # grey -> R = G = B


def _mode(p: Path) -> str:
    from PIL import Image

    with Image.open(p) as im:
        return im.mode


def test_sixteen_bit_images_still_refused(tmp_path):
    from PIL import Image

    root = tmp_path / "imgs"
    mixedfolder.write_mixed_folder(root, n_train=2, n_test=1)
    Image.fromarray(np.full((20, 30), 40000, dtype=np.uint16)).save(root / "train" / "red" / "deep.png")
    with pytest.raises(DataError, match="16-bit"):
        load_data(_cfg(root))


def test_predict_and_deployable_see_the_training_eval_tensor(folder, tmp_path):
    """The same file gives the same uint8 tensor through training-time evaluation and pqd predict,
    and the deployable's logits equal the model's on the evaluation batch."""
    root, test_files = folder
    data = load_data(_cfg(root))
    for i, p in enumerate(test_files):
        assert torch.equal(load_image(p, size=(24, 24), channels=3, preprocess=data.preprocess), data.test.x[i]), p
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(3)).eval()
    model(torch.zeros(1, 3, 24, 24))
    meta = deployable_meta(
        mean=data.mean,
        std=data.std,
        class_names=data.test.classes,
        input_shape=data.image_shape,
        preprocess=data.preprocess,
    )
    path = save_torchscript(
        deployable_torchscript(
            model, mean=data.mean, std=data.std, class_names=data.test.classes, input_shape=data.image_shape
        ),
        tmp_path / "model_int8.pt",
        meta=meta,
    )
    dep = load_deployable(path)
    assert dep.meta["preprocess"] == data.preprocess
    x, _ = next(iter(batches(data.test, batch_size=len(data.test), mean=data.mean, std=data.std)))
    with torch.no_grad():
        want = torch.softmax(model(x), 1).argmax(1)
    got = [r["top"][0]["index"] for r in predict_files(dep, test_files)]
    assert got == want.tolist()


def test_streaming_gives_the_in_memory_batches(folder, caplog):
    root, _ = folder
    caplog.set_level(logging.INFO, logger="pqd.data")
    mem = load_data(_cfg(root, max_memory_gb=10.0))
    assert "within data.max_memory_gb=10: decoding them into memory" in caplog.text
    streamed = load_data(_cfg(root, max_memory_gb=0.0))
    assert "over data.max_memory_gb=0: streaming them from disk" in caplog.text
    assert isinstance(streamed.train, FileDataset) and isinstance(streamed.test, FileDataset)
    assert not isinstance(mem.train, FileDataset)
    # mean/std from the same images (all of them: fewer than the streaming sample)
    assert np.allclose(mem.mean, streamed.mean) and np.allclose(mem.std, streamed.std)
    for augment in (False, True):
        kw = dict(batch_size=5, mean=mem.mean, std=mem.std, shuffle=True, augment=augment, crop_scale=mem.crop_scale)
        a = list(batches(mem.train, generator=torch.Generator().manual_seed(3), **kw))
        b = list(batches(streamed.train, generator=torch.Generator().manual_seed(3), **kw))
        assert len(a) == len(b) == 5
        for (xa, ya), (xb, yb) in zip(a, b, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_streaming_with_workers_and_same_accuracy(folder):
    """Decoding in worker processes; a fixed model scores the same on both paths."""
    root, _ = folder
    mem = load_data(_cfg(root))
    streamed = load_data(DataConfig(dataset="folder", root=str(root), image_size=24, workers=2, max_memory_gb=0.0))
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 5, stride=4), torch.nn.Flatten(), torch.nn.LazyLinear(3)).eval()

    def preds(ds):
        with torch.no_grad():
            return torch.cat([model(x).argmax(1) for x, _ in batches(ds, batch_size=7, mean=mem.mean, std=mem.std)])

    assert torch.equal(preds(mem.test), preds(streamed.test))


def test_augmentation_is_random_resized_crop(folder):
    data = load_data(_cfg(root := folder[0], scale=(0.25, 0.25)))
    x, _ = next(
        iter(
            batches(
                data.train,
                batch_size=24,
                mean=(0.0,) * 3,
                std=(1 / 255,) * 3,
                augment=True,
                crop_scale=data.crop_scale,
                generator=torch.Generator().manual_seed(0),
            )
        )
    )
    assert x.shape == (24, 3, 24, 24)
    assert not torch.equal(x, data.train.x.float())  # crops of a quarter of the area, resized back
    assert root


def test_val_fraction_splits_the_training_folder(folder):
    data = load_data(_cfg(folder[0], val_fraction=0.25))
    assert data.val is not None and len(data.val) == 6 and len(data.train) == 18
    assert data.val.class_counts() == [2, 2, 2]


def test_given_mean_std_are_used(folder):
    data = load_data(_cfg(folder[0], mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2)))
    assert data.mean == (0.5, 0.4, 0.3) and data.std == (0.2, 0.2, 0.2)


@pytest.mark.parametrize(
    "kw, key",
    [
        (dict(dataset="digits", image_size=32), "data.image_size"),
        (dict(dataset="folder", root="x", resize_size=40), "data.resize_size"),
        (dict(dataset="folder", root="x", image_size=32, resize_size=20), "data.resize_size"),
        (dict(dataset="folder", root="x", image_size=32, scale=(0.5, 0.2)), "data.scale"),
        (dict(dataset="folder", root="x", image_size=32, mean=(0.5, 0.5, 0.5)), "data.mean"),
        (dict(dataset="folder", root="x", image_size=32, mean=(0.5, 0.5, 0.5), std=(0.2, 0.0, 0.2)), "data.std"),
    ],
)
def test_bad_image_settings_name_the_key(kw, key):
    with pytest.raises(ConfigError, match=key):
        DataConfig(**kw)
