"""Helpers of the robustness tests: tiny configs and CLI subprocesses (imported by the test modules;
``conftest.py`` puts this folder on ``sys.path``, which also makes ``pqd_user_models`` importable)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).parent


def tiny(**sections) -> dict:
    """A RunConfig dict that runs a whole pipeline in a few seconds on one thread.

    Keyword arguments replace (top-level) or update (sections given as dicts) the defaults.
    """
    cfg = {
        "seed": 0,
        "stages": "P:1,Q:1,D:1",
        "model": {"name": "resnet18", "width": 0.125},
        "data": {"dataset": "digits", "train_subset": 256, "test_subset": 128},
        "train": {"batch_size": 32, "progress": False, "threads": 1},
        "teacher": {"epochs": 2, "lr": 0.05},
        "prune": {"sparsity": 0.5},
        "measure": {"threads": 1, "warmup": 1, "runs": 3, "batch_sizes": [1], "large_batch_runs": 1},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli_env() -> dict:
    """Environment for a ``python -m pqd.cli`` subprocess: this interpreter's path plus the user models."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), *sys.path]), OMP_NUM_THREADS="1")


def pqd_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "pqd.cli", *args]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(pqd_cmd(*args), env=cli_env(), capture_output=True, text=True, timeout=timeout)


def read_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def write_folder(
    root: Path,
    classes=("ant", "bee", "cow"),
    n_train: int = 8,
    n_test: int = 4,
    size: int = 12,
    seed: int = 0,
    mode: str = "RGB",
) -> Path:
    """A learnable image folder ``root/{train,test}/<class>/NNN.png`` (one colour per class, plus noise)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    colours = [(230, 30, 30), (30, 230, 30), (30, 30, 230), (230, 230, 30), (30, 230, 230)]
    for split, n in (("train", n_train), ("test", n_test)):
        for label, cls in enumerate(classes):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = np.clip(
                    np.array(colours[label % len(colours)]) * 0.7 + rng.integers(0, 76, (size, size, 3)), 0, 255
                )
                Image.fromarray(img.astype(np.uint8)).convert(mode).save(d / f"{i:03d}.png")
    return root


def folder_config(root: Path, **sections) -> dict:
    """``tiny()`` on an image folder: small batches, teacher trained for one epoch."""
    cfg = tiny(
        data={"dataset": "folder", "root": str(root), "train_subset": None, "test_subset": None},
        train={"batch_size": 4},
        teacher={"epochs": 1},
    )
    return {
        **cfg,
        **{
            k: ({**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v)
            for k, v in sections.items()
        },
    }
