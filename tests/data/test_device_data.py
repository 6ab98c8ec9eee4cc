"""Device-resident batching: the same batches as the host path for the same generator.

The device path runs here on the CPU device (``resident=True``); on a machine with CUDA the last
test also compares a real GPU-resident epoch with the host path.
"""

from __future__ import annotations

import functools

import pytest
import torch

import pqd.train.loop as loop_module
from pqd.config import TrainConfig
from pqd.data import DEVICE_DATA_ENV, Dataset, Splits, batches, device_data_limit, resident_default
from pqd.data.base import Dataset as BaseDataset
from pqd.models.registry import create_model

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _ds(n: int = 45, h: int = 12, w: int = 10, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, h, w), generator=g, dtype=torch.uint8)
    return Dataset(x, torch.arange(n) % 7, tuple("abcdefg"))


def _epoch(ds, *, resident, seed=3, device="cpu", **kw):
    g = torch.Generator().manual_seed(seed)
    kw = {"batch_size": 8, "mean": MEAN, "std": STD, "shuffle": True, "augment": True, **kw}
    out = [(x.cpu(), y.cpu()) for x, y in batches(ds, generator=g, device=device, resident=resident, **kw)]
    return out, g.get_state()


def _assert_same(a, b):
    (ba, ga), (bb, gb) = a, b
    assert len(ba) == len(bb) > 0
    for (x1, y1), (x2, y2) in zip(ba, bb, strict=True):
        assert x1.dtype == x2.dtype == torch.float32 and x1.stride() == x2.stride()
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(ga, gb), "both paths must leave the generator in the same state"


CASES = [
    {},
    {"hflip": False},
    {"augment": False},
    {"shuffle": False},
    {"drop_last": True, "channels_last": True},
    {"rank": 1, "world_size": 3},
    {"batch_size": 45},
]


@pytest.mark.parametrize("kw", CASES, ids=[",".join(f"{k}={v}" for k, v in c.items()) or "default" for c in CASES])
def test_resident_path_on_cpu_matches_host_path(kw):
    ds = _ds()
    _assert_same(_epoch(ds, resident=True, **kw), _epoch(ds, resident=False, **kw))


def test_tiny_images_where_padding_exceeds_the_image():
    ds = _ds(n=9, h=3, w=2)  # pad clipped to h-1 / w-1
    _assert_same(_epoch(ds, resident=True), _epoch(ds, resident=False))


def test_resident_path_really_runs_and_draws_lazily(monkeypatch):
    ds = _ds()
    calls = []
    real = BaseDataset.on_device
    monkeypatch.setattr(BaseDataset, "on_device", lambda self, d: calls.append(str(d)) or real(self, d))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    kw = {"batch_size": 8, "mean": MEAN, "std": STD, "shuffle": True, "augment": True}
    it1, it2 = batches(ds, generator=g1, resident=True, **kw), batches(ds, generator=g2, resident=False, **kw)
    first1, first2 = next(it1), next(it2)
    assert calls == ["cpu"]
    assert torch.equal(first1[0], first2[0])
    # one batch pulled: the generator has drawn the permutation and one batch's offsets, in both paths
    assert torch.equal(g1.get_state(), g2.get_state())
    assert not torch.equal(g1.get_state(), torch.Generator().manual_seed(5).get_state())


def test_training_is_identical_through_the_resident_path(monkeypatch):
    """A seeded training run gives bit-identical weights whichever path feeds the loop."""
    train_ds = Dataset(
        torch.randint(0, 256, (96, 3, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8),
        torch.arange(96) % 4,
        tuple("abcd"),
    )
    data = Splits(name="rand", train=train_ds, val=None, test=train_ds, mean=(0.5,) * 3, std=(0.25,) * 3, hflip=True)

    def run(resident):
        monkeypatch.setattr(loop_module, "batches", functools.partial(batches, resident=resident))
        torch.manual_seed(0)
        model = create_model("resnet18", num_classes=4, width=0.125)
        loop_module.train(model, data, epochs=2, lr=0.05, config=TrainConfig(batch_size=16, progress=False), seed=1)
        return model.state_dict()

    a, b = run(True), run(False)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_defaults_cpu_stays_on_host_and_limits(monkeypatch):
    ds = _ds()
    assert device_data_limit("cpu") == 0 and not resident_default(ds, "cpu")
    x, y = ds.on_device("cpu")
    assert x is ds.x and y is ds.y and not ds.has_device_copy("cpu")
    # a non-CUDA accelerator name: only the cap applies (no memory query)
    assert device_data_limit("meta", max_mb=1.5) == 1_500_000
    monkeypatch.setenv(DEVICE_DATA_ENV, "0")
    assert device_data_limit("meta") == 0 and not resident_default(ds, "meta")
    monkeypatch.setenv(DEVICE_DATA_ENV, str(ds.nbytes / 1e6))
    assert resident_default(ds, "meta")
    ds.on_device("meta")  # a copy already there is used whatever the size ...
    monkeypatch.setenv(DEVICE_DATA_ENV, "0.000001")
    assert ds.has_device_copy("meta") and resident_default(ds, "meta")
    monkeypatch.setenv(DEVICE_DATA_ENV, "0")  # ... unless the device path is turned off
    assert not resident_default(ds, "meta")
    ds.drop_device_copies()
    monkeypatch.setenv(DEVICE_DATA_ENV, "lots")
    with pytest.raises(ValueError, match=DEVICE_DATA_ENV):
        device_data_limit("meta")
    with pytest.raises(ValueError, match=">= 0"):
        device_data_limit("meta", max_mb=-1)
    assert ds.nbytes == 45 * 3 * 12 * 10 + 45 * 8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_resident_epoch_matches_host_path():
    ds = _ds(n=300, h=32, w=32)
    assert resident_default(ds, "cuda")
    dev = _epoch(ds, resident=None, device="cuda", batch_size=64, channels_last=True)
    assert ds.has_device_copy("cuda")
    _assert_same(dev, _epoch(ds, resident=False, device="cuda", batch_size=64, channels_last=True))
    _assert_same(dev, _epoch(ds, resident=False, device="cpu", batch_size=64, channels_last=True))
    ds.drop_device_copies()
    assert not ds.has_device_copy("cuda")
