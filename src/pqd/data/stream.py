"""Image folders at ``data.image_size``: decoded in worker processes, kept in memory or streamed.

:func:`load_sized_folder` lists an image folder and, per split, either decodes every image's
evaluation crop (:func:`pqd.data.transforms.eval_crop`) into an in-memory uint8
:class:`~pqd.data.base.Dataset` (when the decoded set fits ``data.max_memory_gb``), or keeps a
:class:`FileDataset` that :func:`stream_batches` decodes from disk batch by batch in a
multi-worker ``DataLoader`` (decode, crop and augmentation in the workers). The random draws of
the augmentation are made in the main process from the caller's generator, in the order the
in-memory path draws them, so both paths give the same batches for the same generator.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from pqd.data.base import Dataset
from pqd.data.folder import decode_image, read_source
from pqd.data.transforms import apply_rrc, draw_rrc

STAT_IMAGES = 2000  # images of the training split that mean/std are computed from when streaming


@dataclass(frozen=True)
class FileDataset:
    """Images left on disk: ``sources`` (path or bytes, one per image), ``names``, labels ``y``, at
    ``image_size`` after a shorter-side resize to ``resize_size``; ``workers`` decode them."""

    sources: tuple
    names: tuple[str, ...]
    y: torch.Tensor
    classes: tuple[str, ...]
    image_size: int
    resize_size: int
    workers: int

    def __len__(self) -> int:
        return len(self.sources)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    @property
    def nbytes(self) -> int:
        """Bytes its decoded images would occupy in memory."""
        return len(self) * 3 * self.image_size**2

    def has_device_copy(self, device: torch.device | str) -> bool:
        return False

    def drop_device_copies(self) -> None:
        pass

    def subset(self, index: torch.Tensor | np.ndarray) -> FileDataset:
        idx = torch.as_tensor(index, dtype=torch.int64).tolist()
        return FileDataset(
            tuple(self.sources[i] for i in idx),
            tuple(self.names[i] for i in idx),
            self.y[idx].clone(),
            self.classes,
            self.image_size,
            self.resize_size,
            self.workers,
        )

    def class_counts(self) -> list[int]:
        return torch.bincount(self.y, minlength=len(self.classes)).tolist()


class _Decode(torch.utils.data.Dataset):
    """Map-style dataset of a worker: ``(index, draws row or None)`` -> ``(uint8 [3, S, S], index)``."""

    def __init__(self, ds: FileDataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, item):
        i, draw = item if isinstance(item, tuple) else (item, None)
        ds = self.ds
        img = decode_image(read_source(ds.names[i], ds.sources[i]), ds.names[i], crop=(ds.image_size, ds.resize_size))
        x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
        if draw is not None:
            x = apply_rrc(x[None], draw[None])[0]
        return x, i


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def _loader(ds: FileDataset, batch_sampler, *, pin: bool = False) -> torch.utils.data.DataLoader:
    workers = max(0, int(ds.workers))
    return torch.utils.data.DataLoader(
        _Decode(ds),
        batch_sampler=batch_sampler,
        num_workers=workers,
        worker_init_fn=_worker_init if workers else None,
        pin_memory=pin,
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )


def decode_to_memory(ds: FileDataset, *, desc: str, progress: bool = True, batch_size: int = 64) -> Dataset:
    """Decode every image of ``ds`` (in its workers) into an in-memory uint8 :class:`Dataset`."""
    n = len(ds)
    x = torch.empty(n, 3, ds.image_size, ds.image_size, dtype=torch.uint8)
    chunks = [list(range(s, min(n, s + batch_size))) for s in range(0, n, batch_size)]
    with tqdm(total=n, desc=desc, unit="img", disable=not progress or None) as bar:
        for xb, idx in _loader(ds, chunks):
            x[idx] = xb
            bar.update(len(idx))
    return Dataset(x, ds.y.clone(), ds.classes)


def sample_stats(ds: FileDataset, *, limit: int = STAT_IMAGES, seed: int = 0) -> Dataset:
    """Up to ``limit`` images of ``ds`` decoded (a seeded choice), for the channel statistics."""
    if len(ds) > limit:
        ds = ds.subset(np.sort(np.random.default_rng(seed).choice(len(ds), size=limit, replace=False)))
    return decode_to_memory(ds, desc="mean/std", progress=False)


def stream_batches(
    ds: FileDataset,
    order: torch.Tensor,
    *,
    batch_size: int,
    scale: torch.Tensor,
    bias: torch.Tensor,
    augment: bool,
    hflip: bool,
    crop_scale: Sequence[float] | None,
    generator: torch.Generator | None,
    device: torch.device,
    channels_last: bool,
    drop_last: bool,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of ``ds`` in ``order``, decoded by its workers; the same values as
    :func:`pqd.data.batches` gives for the decoded images (augmentation: RandomResizedCrop +
    flip with ``crop_scale``, drawn here per batch from ``generator``)."""
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    rrc = (float(crop_scale[0]), float(crop_scale[1])) if crop_scale is not None else (1.0, 1.0)

    def sampler():
        for start in range(0, stop, batch_size):
            idx = order[start : start + batch_size].tolist()
            if augment:
                draws = draw_rrc(len(idx), ds.image_size, scale=rrc, hflip=hflip, generator=generator)
                yield list(zip(idx, draws, strict=True))
            else:
                yield idx

    for xb, idx in _loader(ds, sampler(), pin=device.type == "cuda"):
        xb = xb.to(device, non_blocking=True)
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        yield xb.to(torch.float32).mul_(scale).add_(bias), ds.y[idx].to(device, non_blocking=True)


def default_workers() -> int:
    """``data.workers`` when unset: up to 4, never more than the CPUs this process may use."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))


def make_file_dataset(
    entries: list, classes: tuple[str, ...], *, image_size: int, resize_size: int, workers: int
) -> FileDataset:
    """A :class:`FileDataset` of ``(name, bytes or path, label)`` entries (:func:`pqd.data.folder.list_image_folder`)."""
    names = tuple(e[0] for e in entries)
    sources = tuple(e[1] for e in entries)
    y = torch.tensor([e[2] for e in entries], dtype=torch.int64)
    return FileDataset(sources, names, y, classes, image_size, resize_size, workers)
