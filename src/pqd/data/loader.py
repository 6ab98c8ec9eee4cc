"""airbench-style batching: index the in-memory uint8 tensor, augment whole batches with tensor ops,
move uint8 to the device, then convert to float and normalise there."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from pqd.data.base import Dataset

PAD = 4  # random-crop padding, reflect mode (mirror without repeating the edge pixel)


def num_batches(n: int, batch_size: int, drop_last: bool = False, world_size: int = 1) -> int:
    """Batches per epoch (per rank) that :func:`batches` yields for ``n`` images."""
    per_rank = n // world_size if world_size > 1 else n
    return per_rank // batch_size if drop_last else -(-per_rank // batch_size)


def epoch_order(n: int, *, shuffle: bool, generator: torch.Generator | None, rank: int = 0, world_size: int = 1) -> torch.Tensor:
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


def crop_flip_index(b: int, h: int, w: int, *, hflip: bool, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Source ``rows [b, h]`` and ``cols [b, w]`` of a random reflect-padded crop (+ optional flip) per image."""
    ph, pw = min(PAD, h - 1), min(PAD, w - 1)
    dy = torch.randint(-ph, ph + 1, (b, 1), generator=generator)
    dx = torch.randint(-pw, pw + 1, (b, 1), generator=generator)
    j = torch.arange(w).expand(b, w)
    if hflip:
        flip = torch.rand(b, 1, generator=generator) < 0.5
        j = torch.where(flip, w - 1 - j, j)
    return _reflect(dy + torch.arange(h), h), _reflect(dx + j, w)


def batches(
    ds: Dataset,
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
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(images, labels)``: float32 ``(x/255 - mean) / std`` on ``device`` and int64 labels.

    ``augment``: random crop with 4-pixel reflect padding and, if ``hflip``, a random horizontal flip,
    drawn per image from ``generator`` (after the shuffle permutation), so a seeded generator gives
    identical epochs.
    """
    c = ds.x.shape[1]
    if len(mean) != c or len(std) != c:
        raise ValueError(f"mean/std need {c} values (one per channel), got {len(mean)} and {len(std)}")
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}, {world_size}")
    device = torch.device(device)
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], device=device).view(1, c, 1, 1)
    bias = torch.tensor([-m / s for m, s in zip(mean, std)], device=device).view(1, c, 1, 1)
    order = epoch_order(len(ds), shuffle=shuffle, generator=generator, rank=rank, world_size=world_size)
    return _iterate(ds, order, batch_size, scale, bias, augment, hflip, generator, device, channels_last, drop_last)


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
