"""Synthetic data fixtures: tiny image folders (dir / .tar.gz) and fake standard CIFAR archives."""

from __future__ import annotations

import io
import pickle
import tarfile
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(autouse=True)
def _no_home_cache(tmp_path, monkeypatch):
    """Never touch the user's ~/.cache/pqd: the env fallback points into tmp_path."""
    monkeypatch.setenv("PQD_CACHE", str(tmp_path / "env-cache"))


@pytest.fixture
def cache_dir(tmp_path) -> str:
    return str(tmp_path / "cache")


def write_folder(
    root: Path, classes=("cat", "dog", "emu"), n_train=4, n_test=2, size=(6, 5), seed=0, fmt="png"
) -> dict:
    """train/<cls>/NNN.<fmt> + test/<cls>/...; returns {split: (x uint8 NCHW, y)} in load order."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        xs, ys = [], []
        for label, cls in enumerate(sorted(classes)):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(img).save(d / f"{i:03d}.{fmt}")
                xs.append(img.transpose(2, 0, 1))
                ys.append(label)
        out[split] = (np.stack(xs), np.array(ys))
    return out


def tar_dir(src: Path, dst: Path, prefix: str = "") -> Path:
    """Pack src/train and src/test into dst (.tar.gz), optionally under a wrapper folder ``prefix``."""
    with tarfile.open(dst, "w:gz") as tf:
        for split in ("train", "test"):
            if (src / split).exists():
                tf.add(src / split, arcname=f"{prefix}{split}")
    return dst


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def write_cifar10_archive(
    path: Path, n_per_batch: int = 6, seed: int = 0, protocol: int = 4, poison: bytes | None = None
) -> dict:
    """A structurally faithful cifar-10-python.tar.gz with random pixels (bytes keys like the real pickles)."""
    rng = np.random.default_rng(seed)
    out = {"train": ([], []), "test": ([], [])}
    with tarfile.open(path, "w:gz") as tf:
        for name, split in [*((f"data_batch_{i}", "train") for i in range(1, 6)), ("test_batch", "test")]:
            data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
            labels = [int(v) for v in rng.integers(0, 10, n_per_batch)]
            batch = {
                b"batch_label": name.encode(),
                b"labels": labels,
                b"data": data,
                b"filenames": [b"x.png"] * n_per_batch,
            }
            blob = poison if (poison is not None and name == "data_batch_1") else pickle.dumps(batch, protocol=protocol)
            _add(tf, f"cifar-10-batches-py/{name}", blob)
            out[split][0].append(data.reshape(-1, 3, 32, 32))
            out[split][1].append(labels)
        meta = {
            b"label_names": [n.encode() for n in CIFAR10_NAMES],
            b"num_vis": 3072,
            b"num_cases_per_batch": n_per_batch,
        }
        _add(tf, "cifar-10-batches-py/batches.meta", pickle.dumps(meta, protocol=protocol))
        _add(tf, "cifar-10-batches-py/readme.html", b"<html></html>")
    return {k: (np.concatenate(v[0]), np.concatenate(v[1])) for k, v in out.items()}


def write_cifar100_archive(path: Path, n: int = 8, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    with tarfile.open(path, "w:gz") as tf:
        for split in ("train", "test"):
            data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
            fine = [int(v) for v in rng.integers(0, 100, n)]
            coarse = [int(v) for v in rng.integers(0, 20, n)]
            batch = {b"data": data, b"fine_labels": fine, b"coarse_labels": coarse, b"filenames": [b"x"] * n}
            _add(tf, f"cifar-100-python/{split}", pickle.dumps(batch, protocol=5))
            out[split] = (data.reshape(-1, 3, 32, 32), np.array(fine))
        meta = {b"fine_label_names": [f"c{i:02d}".encode() for i in range(100)], b"coarse_label_names": [b"s"] * 20}
        _add(tf, "cifar-100-python/meta", pickle.dumps(meta, protocol=5))
    return out


@pytest.fixture
def folder_factory(tmp_path) -> Callable[..., tuple[Path, dict]]:
    def make(name: str = "imgs", **kw) -> tuple[Path, dict]:
        root = tmp_path / name
        return root, write_folder(root, **kw)

    return make


@pytest.fixture
def helpers() -> SimpleNamespace:
    """The writer functions above (conftest is not importable under every pytest import mode)."""
    return SimpleNamespace(
        write_folder=write_folder,
        tar_dir=tar_dir,
        cifar10=write_cifar10_archive,
        cifar100=write_cifar100_archive,
        CIFAR10_NAMES=CIFAR10_NAMES,
    )
