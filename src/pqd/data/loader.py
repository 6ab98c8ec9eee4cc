"""airbench-style batching: index the in-memory uint8 tensor, augment whole batches with tensor ops,
then convert to float and normalise on the training device.

Two paths give the same batches:

* **host** (the CPU default): gather and augment uint8 batches on the CPU, copy each to the device.
* **device-resident** (the default on an accelerator when the dataset fits, see
  :func:`resident_default`): the uint8 dataset is copied to the device once
  (:meth:`pqd.data.Dataset.on_device`) and every batch is gathered and augmented there.

RNG semantics (both paths): every random number comes from the CPU ``generator``, drawn in the same
order: the epoch's permutation first (``torch.randperm(n)``), then per batch, lazily as the batch is
produced, the crop offsets ``dy`` then ``dx`` (``torch.randint(-4, 5, (b, 1))`` each; the 4 clipped to side - 1 for tiny images) and, with
``hflip``, the flip draw (``torch.rand(b, 1) < 0.5``). The device path copies those few numbers per
batch to the device and builds the same gather indices there. Gathering, the uint8→float conversion
and the two elementwise ops of the normalisation are exact or identically rounded on every device,
so for a given generator state the two paths yield identical batches, and the generator ends in the
same state. The accelerator's own RNG is never used.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import torch

from pqd.data.base import Dataset
from pqd.data.stream import FileDataset, stream_batches
from pqd.data.transforms import apply_rrc, draw_rrc

PAD = 4  # random-crop padding, reflect mode (mirror without repeating the edge pixel)
DEVICE_DATA_ENV = "PQD_DEVICE_DATA_MB"  # cap (MB) on a device-resident dataset; 0 turns the device path off
DEFAULT_DEVICE_DATA_MB = 4096
FREE_MEMORY_SHARE = 0.25  # and at most this share of the device's free memory


def _cap_mb(max_mb: float | None) -> float:
    if max_mb is None:
        raw = os.environ.get(DEVICE_DATA_ENV, "")
        try:
            max_mb = float(raw) if raw.strip() else DEFAULT_DEVICE_DATA_MB
        except ValueError:
            raise ValueError(
                f"${DEVICE_DATA_ENV}={raw!r}: expected a number of megabytes (0 turns the device data path off)"
            ) from None
    if max_mb < 0:
        raise ValueError(f"the device data limit must be >= 0 MB, got {max_mb}")
    return max_mb


def device_data_limit(device: torch.device | str, *, max_mb: float | None = None) -> int:
    """Most bytes a dataset may occupy to be kept on ``device`` (0 for the CPU).

    ``max_mb`` (default: ``$PQD_DEVICE_DATA_MB`` or 4096) caps it; on CUDA it is also at most a
    quarter of the memory free on the device when asked.
    """
    device = torch.device(device)
    limit = int(_cap_mb(max_mb) * 1e6)
    if device.type == "cpu":
        return 0
    if device.type == "cuda" and limit > 0 and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(device)
        limit = min(limit, int(free * FREE_MEMORY_SHARE))
    return limit


def resident_default(ds: Dataset, device: torch.device | str, *, max_mb: float | None = None) -> bool:
    """Whether :func:`batches` keeps ``ds`` on ``device`` when not told: an accelerator and a dataset
    within :func:`device_data_limit` (a copy already there counts as fitting, unless the cap is 0)."""
    device = torch.device(device)
    cap = _cap_mb(max_mb)
    if device.type == "cpu" or cap == 0:
        return False
    if ds.has_device_copy(device):  # already paid for
        return True
    return ds.nbytes <= device_data_limit(device, max_mb=cap)


def num_batches(n: int, batch_size: int, drop_last: bool = False, world_size: int = 1) -> int:
    """Batches per epoch (per rank) that :func:`batches` yields for ``n`` images."""
    per_rank = n // world_size if world_size > 1 else n
    return per_rank // batch_size if drop_last else -(-per_rank // batch_size)


def epoch_order(
    n: int, *, shuffle: bool, generator: torch.Generator | None, rank: int = 0, world_size: int = 1
) -> torch.Tensor:
    """Image order for one epoch on ``rank``: a strided shard of one permutation shared by all ranks.

    With ``world_size > 1`` every rank gets ``n // world_size`` images and the ``n % world_size``
    left over at the end of the permutation are skipped (different ones each epoch when shuffling).
    Ranks must pass generators seeded alike so they draw the same permutation.
    """
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    if world_size > 1:
        order = order[: n // world_size * world_size][rank::world_size]
    return order


def _reflect(i: torch.Tensor, size: int) -> torch.Tensor:
    i = i.abs()
    return torch.where(i >= size, 2 * (size - 1) - i, i)


def draw_crop_flip(b: int, h: int, w: int, *, hflip: bool, generator: torch.Generator | None) -> torch.Tensor:
    """The random draws of one augmented batch, on the CPU: ``[b, 3]`` int64 columns ``dy, dx, flip``
    (offsets in ``[-pad, pad]``, flip 0/1; always 0 without ``hflip``, which draws nothing for it)."""
    ph, pw = min(PAD, h - 1), min(PAD, w - 1)
    dy = torch.randint(-ph, ph + 1, (b, 1), generator=generator)
    dx = torch.randint(-pw, pw + 1, (b, 1), generator=generator)
    flip = (torch.rand(b, 1, generator=generator) < 0.5).long() if hflip else torch.zeros(b, 1, dtype=torch.int64)
    return torch.cat([dy, dx, flip], 1)


def crop_flip_grid(draws: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Source ``rows [b, h]`` and ``cols [b, w]`` for the ``draws`` of :func:`draw_crop_flip`, on their device."""
    b, dev = draws.shape[0], draws.device
    dy, dx, flip = draws[:, 0:1], draws[:, 1:2], draws[:, 2:3].bool()
    j = torch.arange(w, device=dev).expand(b, w)
    j = torch.where(flip, w - 1 - j, j)
    return _reflect(dy + torch.arange(h, device=dev), h), _reflect(dx + j, w)


def crop_flip_index(
    b: int, h: int, w: int, *, hflip: bool, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Source ``rows [b, h]`` and ``cols [b, w]`` of a random reflect-padded crop (+ optional flip) per image."""
    return crop_flip_grid(draw_crop_flip(b, h, w, hflip=hflip, generator=generator), h, w)


def batches(
    ds: Dataset | FileDataset,
    *,
    batch_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    shuffle: bool = False,
    augment: bool = False,
    hflip: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    channels_last: bool = False,
    drop_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
    resident: bool | None = None,
    crop_scale: Sequence[float] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(images, labels)``: float32 ``(x/255 - mean) / std`` on ``device`` and int64 labels.

    ``augment``: random crop with 4-pixel reflect padding and, if ``hflip``, a random horizontal flip,
    drawn per image from ``generator`` (after the shuffle permutation), so a seeded generator gives
    identical epochs.

    ``resident``: gather and augment on ``device`` from a copy of the dataset kept there (True) or on
    the CPU (False); ``None`` picks :func:`resident_default` (the device path on an accelerator when the
    dataset fits). Both give the same batches for the same generator (see the module docstring).

    ``crop_scale`` (with ``augment``): RandomResizedCrop with that area range + optional flip instead
    of the padded crop (:mod:`pqd.data.transforms`; images of ``data.image_size``). A
    :class:`~pqd.data.stream.FileDataset` is decoded from disk by worker processes
    (:func:`~pqd.data.stream.stream_batches`), with the same values as its decoded images give here.
    """
    c = ds.image_shape[0]
    if len(mean) != c or len(std) != c:
        raise ValueError(f"mean/std need {c} values (one per channel), got {len(mean)} and {len(std)}")
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}, {world_size}")
    device = torch.device(device)
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], device=device).view(1, c, 1, 1)
    bias = torch.tensor([-m / s for m, s in zip(mean, std, strict=True)], device=device).view(1, c, 1, 1)
    order = epoch_order(len(ds), shuffle=shuffle, generator=generator, rank=rank, world_size=world_size)
    if isinstance(ds, FileDataset):
        return stream_batches(
            ds,
            order,
            batch_size=batch_size,
            scale=scale,
            bias=bias,
            augment=augment,
            hflip=hflip,
            crop_scale=crop_scale,
            generator=generator,
            device=device,
            channels_last=channels_last,
            drop_last=drop_last,
        )
    if augment and crop_scale is not None:
        return _iterate_rrc(
            ds, order, batch_size, scale, bias, tuple(crop_scale), hflip, generator, device, channels_last, drop_last
        )
    if resident is None:
        resident = resident_default(ds, device)
    run = _iterate_resident if resident else _iterate
    return run(ds, order, batch_size, scale, bias, augment, hflip, generator, device, channels_last, drop_last)


def _iterate(ds, order, batch_size, scale, bias, augment, hflip, generator, device, channels_last, drop_last):
    _, c, h, w = ds.x.shape
    chan = torch.arange(c).view(1, c, 1, 1)
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        if augment:
            rows, cols = crop_flip_index(len(idx), h, w, hflip=hflip, generator=generator)
            xb = ds.x[idx.view(-1, 1, 1, 1), chan, rows[:, None, :, None], cols[:, None, None, :]]
        else:
            xb = ds.x[idx]
        xb = xb.to(device, non_blocking=True)
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        xf = xb.to(torch.float32).mul_(scale).add_(bias)
        yield xf, ds.y[idx].to(device, non_blocking=True)


def _iterate_rrc(ds, order, batch_size, scale, bias, crop_scale, hflip, generator, device, channels_last, drop_last):
    size = ds.x.shape[-1]
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        draws = draw_rrc(len(idx), size, scale=crop_scale, hflip=hflip, generator=generator)
        xb = apply_rrc(ds.x[idx], draws).to(device, non_blocking=True)
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        yield xb.to(torch.float32).mul_(scale).add_(bias), ds.y[idx].to(device, non_blocking=True)


def _iterate_resident(ds, order, batch_size, scale, bias, augment, hflip, generator, device, channels_last, drop_last):
    _, c, h, w = ds.x.shape
    x, y = ds.on_device(device)
    chan = torch.arange(c, device=device).view(1, c, 1, 1)
    order = order.to(device, non_blocking=True)
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        if augment:
            draws = draw_crop_flip(len(idx), h, w, hflip=hflip, generator=generator).to(device, non_blocking=True)
            rows, cols = crop_flip_grid(draws, h, w)
            xb = x[idx.view(-1, 1, 1, 1), chan, rows[:, None, :, None], cols[:, None, None, :]]
        else:
            xb = x[idx]
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        xf = xb.to(torch.float32).mul_(scale).add_(bias)
        yield xf, y[idx]
