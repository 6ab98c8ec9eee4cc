"""Datasets held in memory as one uint8 tensor, with airbench-style batching.

``load_data(cfg, seed=...)`` gives :class:`Splits`; ``batches(...)`` iterates normalised (optionally
augmented) batches, gathered on the training device from a copy kept there when the dataset fits
(``$PQD_DEVICE_DATA_MB`` caps it), else on the CPU; both give the same batches. Decoded CIFAR / image-folder data is cached as ``.npy`` under ``data.cache_dir``,
``$PQD_CACHE`` or ``~/.cache/pqd``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pqd.config import DataConfig
from pqd.data.base import Dataset, Raw, log
from pqd.data.cache import cache_root, cached
from pqd.data.cifar import SPECS, RestrictedUnpickler, locate, read_cifar, restricted_loads
from pqd.data.digits import read_digits
from pqd.data.folder import list_image_folder, read_image_folder
from pqd.data.loader import DEVICE_DATA_ENV, batches, device_data_limit, epoch_order, num_batches, resident_default
from pqd.data.splits import Splits
from pqd.data.stream import FileDataset, decode_to_memory, default_workers, make_file_dataset, sample_stats
from pqd.data.transforms import default_resize, preprocess_record
from pqd.errors import DataError

__all__ = [
    "DEVICE_DATA_ENV",
    "Dataset",
    "FileDataset",
    "RestrictedUnpickler",
    "Splits",
    "batches",
    "cache_root",
    "channel_stats",
    "device_data_limit",
    "epoch_order",
    "load_data",
    "load_sized_folder",
    "num_batches",
    "resident_default",
    "restricted_loads",
    "stratified_split",
    "stratified_subset",
]

# independent random streams derived from the seed
_TRAIN_SUBSET, _TEST_SUBSET, _VAL_SPLIT = 1, 2, 3
TEST_SUBSET_SEED = 0  # the test subset ignores the run seed so runs with different seeds share it


def load_data(cfg: DataConfig, *, seed: int = 0) -> Splits:
    """Load ``cfg.dataset``, take the seeded stratified subsets / validation split, compute mean/std.

    Order: ``train_subset`` picks from the train split, then ``val_fraction`` of that is carved off as val;
    ``test_subset`` uses a fixed seed. mean/std come from the final train split.
    """
    if cfg.image_size is not None:
        return load_sized_folder(cfg, seed=seed)
    raw, name, hflip = _read(cfg)
    train, test = raw.to_datasets()
    if cfg.train_subset is not None:
        train = train.subset(stratified_subset(train.y, cfg.train_subset, _rng(seed, _TRAIN_SUBSET)))
    if cfg.test_subset is not None:
        test = test.subset(stratified_subset(test.y, cfg.test_subset, _rng(TEST_SUBSET_SEED, _TEST_SUBSET)))
    val = None
    if cfg.val_fraction > 0:
        keep, held = stratified_split(train.y, cfg.val_fraction, _rng(seed, _VAL_SPLIT))
        train, val = train.subset(keep), train.subset(held)
    mean, std = (
        (tuple(cfg.mean), tuple(cfg.std)) if cfg.mean is not None and cfg.std is not None else channel_stats(train.x)
    )
    log.debug(
        "%s: train %d, val %d, test %d, image %s", name, len(train), len(val or ()), len(test), tuple(train.x.shape[1:])
    )
    return Splits(name, train, val, test, mean, std, hflip)


def load_sized_folder(cfg: DataConfig, *, seed: int = 0) -> Splits:
    """An image folder at ``cfg.image_size``: subsets and validation split as :func:`load_data` takes
    them (on the file list, before decoding), then each split decoded into memory when the whole
    decoded set fits ``cfg.max_memory_gb``, else streamed from disk (the log says which and why)."""
    assert cfg.image_size is not None
    size = cfg.image_size
    resize = cfg.resize_size or default_resize(size)
    path = Path(str(cfg.root)).expanduser()
    classes, entries = list_image_folder(path)
    workers = default_workers() if cfg.workers is None else cfg.workers
    train, test = (
        make_file_dataset(entries[s], classes, image_size=size, resize_size=resize, workers=workers)
        for s in ("train", "test")
    )
    if cfg.train_subset is not None:
        train = train.subset(stratified_subset(train.y, cfg.train_subset, _rng(seed, _TRAIN_SUBSET)))
    if cfg.test_subset is not None:
        test = test.subset(stratified_subset(test.y, cfg.test_subset, _rng(TEST_SUBSET_SEED, _TEST_SUBSET)))
    val = None
    if cfg.val_fraction > 0:
        keep, held = stratified_split(train.y, cfg.val_fraction, _rng(seed, _VAL_SPLIT))
        train, val = train.subset(keep), train.subset(held)
    parts = {"train": train, "val": val, "test": test}
    need = sum(d.nbytes for d in parts.values() if d is not None)
    budget = cfg.max_memory_gb * 1e9
    if need <= budget:
        log.info(
            "data: %d images at %dx%d need %.2f GB decoded, within data.max_memory_gb=%g: decoding them into memory "
            "(%d workers)",
            sum(len(d) for d in parts.values() if d is not None),
            size,
            size,
            need / 1e9,
            cfg.max_memory_gb,
            workers,
        )
        mem_train = decode_to_memory(train, desc="decoding train")
        mem_val = decode_to_memory(val, desc="decoding val") if val is not None else None
        splits: tuple[Dataset | FileDataset, Dataset | FileDataset | None, Dataset | FileDataset] = (
            mem_train,
            mem_val,
            decode_to_memory(test, desc="decoding test"),
        )
        stats_from: Dataset | None = mem_train
    else:
        log.info(
            "data: %d images at %dx%d would need %.2f GB decoded, over data.max_memory_gb=%g: streaming them from disk "
            "with %d workers (decode + augment in the workers); raise data.max_memory_gb to hold them in memory",
            sum(len(d) for d in parts.values() if d is not None),
            size,
            size,
            need / 1e9,
            cfg.max_memory_gb,
            workers,
        )
        splits = (train, val, test)
        stats_from = sample_stats(train) if cfg.mean is None else None
    if cfg.mean is not None and cfg.std is not None:
        mean, std = tuple(cfg.mean), tuple(cfg.std)
    else:
        assert stats_from is not None  # DataConfig takes data.mean and data.std together or neither
        mean, std = channel_stats(stats_from.x)
    return Splits(
        f"folder:{cfg.root}",
        *splits,
        mean,
        std,
        True,
        preprocess=preprocess_record(size, resize),
        crop_scale=(float(cfg.scale[0]), float(cfg.scale[1])),
    )


def _read(cfg: DataConfig) -> tuple[Raw, str, bool]:
    if cfg.dataset == "digits":
        return read_digits(), "digits", False
    cache = cache_root(cfg.cache_dir)
    if cfg.dataset in SPECS:
        spec = SPECS[cfg.dataset]
        kind, path = locate(spec, cfg.root, cfg.download, cache / "downloads")
        return cached(cache, f"{spec.name}-{kind}", path, lambda: read_cifar(spec, kind, path)), spec.name, True
    path = Path(str(cfg.root)).expanduser()
    if not path.exists():
        raise DataError(
            f"data.root {cfg.root!r} does not exist; set it to a directory or .tar.gz with train/<class>/* and test/<class>/*"
        )
    return cached(cache, "folder", path, lambda: read_image_folder(path)), f"folder:{cfg.root}", True


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([stream, seed % 2**64])


def _take(y: np.ndarray, quota: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random ``quota[c]`` indices of each class c, sorted."""
    picked = [rng.permutation(np.flatnonzero(y == c))[:q] for c, q in enumerate(quota)]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def stratified_subset(y: torch.Tensor, n: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``n`` images, spread over classes as evenly as their sizes allow (all if ``n >= len(y)``)."""
    labels = y.numpy()
    counts = np.bincount(labels) if len(labels) else np.zeros(0, dtype=np.int64)
    quota = np.zeros_like(counts)
    remaining = min(n, len(labels))
    if n > len(labels):
        log.warning("subset of %d asked for but only %d images exist; using all of them", n, len(labels))
    while remaining > 0:
        open_ = np.flatnonzero(quota < counts)
        share = remaining // len(open_)
        if share == 0:  # fewer left than classes: a seeded choice of classes gets one more
            quota[rng.choice(open_, size=remaining, replace=False)] += 1
            break
        add = np.minimum(counts[open_] - quota[open_], share)
        quota[open_] += add
        remaining -= int(add.sum())
    return _take(labels, quota, rng)


def stratified_split(y: torch.Tensor, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``(keep, held)`` indices: ``round(fraction * N)`` (at least 1) held out, proportionally per class."""
    labels = y.numpy()
    counts = np.bincount(labels)
    n_held = max(1, round(fraction * len(labels)))
    exact = counts * (n_held / len(labels))
    quota = np.floor(exact).astype(np.int64)
    extra = n_held - int(quota.sum())
    quota[np.argsort(-(exact - quota), kind="stable")[:extra]] += 1  # largest remainders
    held = _take(labels, quota, rng)
    return np.setdiff1d(np.arange(len(labels)), held), held


def channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 images in [0, 1] units, from exact histograms."""
    a = x.numpy()
    v = np.arange(256, dtype=np.float64) / 255
    hist = np.stack([np.bincount(a[:, c].ravel(), minlength=256) for c in range(a.shape[1])]).astype(np.float64)
    n = np.maximum(hist.sum(1), 1)
    mean = hist @ v / n
    std = np.sqrt(np.maximum(hist @ (v * v) / n - mean**2, 0))
    std = np.where(std > 1e-6, std, 1.0)  # a constant channel: avoid dividing by 0
    return tuple(mean.tolist()), tuple(std.tolist())
