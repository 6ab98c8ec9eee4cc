from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from pqd.data import Dataset, Splits


def _blobs(n: int, num_classes: int, size: int, seed: int) -> Dataset:
    """Learnable synthetic images: each class has its own colour (crop/flip invariant) plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % num_classes
    corners = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1], [1, 1, 1], [0, 0, 0]])
    colours = (corners[:num_classes] * 255).view(num_classes, 3, 1, 1)
    x = colours[y] * 0.6 + torch.rand(n, 3, size, size, generator=g) * 255 * 0.4
    return Dataset(x=x.to(torch.uint8).contiguous(), y=y.long(), classes=tuple(str(i) for i in range(num_classes)))


@pytest.fixture(scope="session")
def tiny_data() -> Splits:
    """A 4-class, 16x16 in-memory dataset: 256 train / 64 test images."""
    train, test = _blobs(256, 4, 16, 0), _blobs(64, 4, 16, 1)
    return Splits(name="blobs", train=train, val=None, test=test, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), hflip=True)


@pytest.fixture()
def tiny_config():
    """A RunConfig dict small enough to run a whole pipeline in seconds."""
    return {
        "seed": 0,
        "stages": "P:2,Q:2,D:2",
        "model": {"name": "resnet18", "width": 0.125},
        "data": {"dataset": "digits", "train_subset": 600, "test_subset": 200},
        "train": {"batch_size": 32, "progress": False, "threads": 2},
        "teacher": {"epochs": 4, "lr": 0.05},
        "prune": {"sparsity": 0.5},
        "measure": {"threads": 1, "warmup": 2, "runs": 5, "batch_sizes": [1], "large_batch_runs": 2},
    }


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """``$PQD_DATA_DIR`` holding the CIFAR JPEG copies; skips when absent (fresh clones)."""
    root = os.environ.get("PQD_DATA_DIR")
    if not root or not (Path(root) / "cifar10-jpeg.tar.gz").is_file():
        pytest.skip("set PQD_DATA_DIR to the folder holding cifar10-jpeg.tar.gz to run this test (CI uses ../shared/data)")
    return Path(root)
