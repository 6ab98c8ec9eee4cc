from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch

from pqd.data import Dataset, Splits, load_data
from pqd.run.config import RunConfig
from pqd.run.pipeline import build_model, run_pipeline
from pqd.train.checkpoint import save_checkpoint
from pqd.train.loop import train

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one pytest worker per core (pyproject's ``-n auto``): each computes on one thread, and so do the pqd
    # processes the tests start (latency workers set their own threads in their controlled environment)
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(config, items):
    """Test files holding a test marked ``slow`` run first: with one worker per core the short ones then
    fill in around them, instead of one worker finishing a long test alone at the end of the run. A
    file's tests stay together, so a fixture shared by a file's tests is built once per worker."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow") is not None}
    items.sort(key=lambda item: item.path not in slow_files)


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
    return Splits(
        name="blobs", train=train, val=None, test=test, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), hflip=True
    )


TINY_CONFIG = {
    "seed": 0,
    "stages": "P:2,Q:2,D:2",
    "model": {"name": "resnet18", "width": 0.125},
    "data": {"dataset": "digits", "train_subset": 600, "test_subset": 200},
    "train": {"batch_size": 32, "progress": False},
    "teacher": {"epochs": 4, "lr": 0.05},
    "prune": {"sparsity": 0.5},
    "measure": {"threads": 1, "warmup": 2, "runs": 5, "batch_sizes": [1], "large_batch_runs": 2},
}


@pytest.fixture()
def tiny_config() -> dict:
    """A RunConfig dict small enough to run a whole pipeline in seconds (the tests' one tiny config)."""
    return copy.deepcopy(TINY_CONFIG)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> dict:
    """The ``teacher`` section of a run that starts from a trained tiny teacher instead of training one.

    The teacher is ``tiny_config``'s (ResNet-18 x0.125 on its digits subset, same epochs, lr, batch
    size and seed), trained once per test session and saved as safetensors; pipeline tests that are
    not about training the teacher use ``tiny_config | {"teacher": tiny_teacher}``.
    """
    cfg = RunConfig.from_dict(TINY_CONFIG | {"stages": ""})
    data = load_data(cfg.data, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, data.num_classes)
    train(
        model,
        data,
        epochs=cfg.teacher.epochs,
        lr=cfg.teacher.lr,
        config=cfg.train,
        seed=cfg.seed,
        tag="teacher",
        amp=True,
        augment=cfg.data.augment,
    )
    path = tmp_path_factory.mktemp("tiny_teacher") / "teacher.safetensors"
    save_checkpoint(path, model.state_dict(), {"model": cfg.model.name, "num_classes": data.num_classes})
    return {"epochs": 0, "weights": str(path)}


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """``finished_run(config) -> (metrics, run folder)``: ``run_pipeline`` once per distinct config in a
    test session; later calls with the same config get the same finished folder (and a copy of its
    metrics). The folder is shared: a test that writes into it works on a copy (``shutil.copytree``).
    """
    done: dict[str, tuple[dict, Path]] = {}

    def run(config: RunConfig) -> tuple[dict, Path]:
        key = json.dumps(config.to_dict(), sort_keys=True)
        if key not in done:
            out = tmp_path_factory.mktemp("finished_run")
            done[key] = (run_pipeline(config, out), out)
        metrics, out = done[key]
        return copy.deepcopy(metrics), out

    return run


@pytest.fixture(scope="session")
def int8_run(tmp_path_factory, tiny_teacher) -> Path:
    """A finished P -> Q -> D run of the shared tiny teacher on digits (the demo's recipe, shrunk),
    shared by the tests that read a finished run (export, bench, metrics): copy it before changing it.

    The whole test split (360 images) is kept so that agreement fractions mean something.
    """
    cfg = TINY_CONFIG | {
        "stages": "P:1,Q:1,D:1",
        "data": {"dataset": "digits", "train_subset": 600},
        "teacher": tiny_teacher,
        "prune": {"sparsity": 0.6},
        "measure": {"threads": 1, "warmup": 1, "runs": 3, "batch_sizes": [1], "large_batch_runs": 1},
    }
    out = tmp_path_factory.mktemp("int8_run")
    run_pipeline(RunConfig.from_dict(cfg), out)
    return out


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """``$PQD_DATA_DIR`` holding the CIFAR JPEG copies; skips when absent (fresh clones)."""
    root = os.environ.get("PQD_DATA_DIR")
    if not root or not (Path(root) / "cifar10-jpeg.tar.gz").is_file():
        pytest.skip(
            "set PQD_DATA_DIR to the folder holding cifar10-jpeg.tar.gz to run this test (CI uses ../shared/data)"
        )
    return Path(root)


@pytest.fixture()
def digits_config(tiny_config, tiny_teacher):
    """``tiny_config`` from the shared trained teacher, with 400 training digits and the fewest timed runs."""
    return tiny_config | {
        "teacher": tiny_teacher,
        "data": {"dataset": "digits", "train_subset": 400, "test_subset": 200},
        "measure": {"threads": 1, "warmup": 1, "runs": 3, "batch_sizes": [1], "large_batch_runs": 1},
    }
