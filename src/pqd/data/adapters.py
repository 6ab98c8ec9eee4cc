"""Bring user data into pqd: any ``torch.utils.data.Dataset`` / ``DataLoader`` (or an
``(images, labels)`` tensor pair) becomes a :class:`pqd.data.Dataset` (uint8 images in memory)
or a :class:`pqd.data.Splits`, which is what pqd's stages, calibration and evaluation take.

Images may be uint8 ``[C, H, W]`` (e.g. ``PILToTensor()``) or float in ``[0, 1]`` (e.g.
``ToTensor()``); images already normalised with ``Normalize(mean, std)`` are accepted when
that ``mean``/``std`` is passed as ``normalized_with=(mean, std)``, and are un-normalised.
Labels are integers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from pqd.data.base import Dataset
from pqd.data.splits import Splits
from pqd.errors import DataError

__all__ = ["as_dataset", "as_splits", "require_splits"]

_TOLERANCE = 1.0 / 512  # float images off [0, 1] by less than half a uint8 step are rounding noise


def _to_uint8(x: torch.Tensor, normalized_with: tuple[Sequence[float], Sequence[float]] | None) -> torch.Tensor:
    if x.dim() != 4:
        hint = " (grayscale images need a channel dimension: [N, 1, H, W])" if x.dim() == 3 else ""
        raise DataError(f"image batches must be [N, C, H, W], got shape {tuple(x.shape)}{hint}")
    if x.dtype == torch.uint8:
        return x
    if not x.is_floating_point():
        raise DataError(f"images must be uint8 or float tensors, got {x.dtype}")
    x = x.detach().float().cpu()
    if normalized_with is not None:
        mean, std = normalized_with
        c = x.shape[1]
        if len(mean) != c or len(std) != c:
            raise DataError(
                f"normalized_with needs {c} mean and {c} std values (one per channel), got {len(mean)} and {len(std)}"
            )
        x = x * torch.tensor(std).view(1, c, 1, 1) + torch.tensor(mean).view(1, c, 1, 1)
    lo, hi = float(x.min()), float(x.max())
    if lo < -_TOLERANCE or hi > 1 + _TOLERANCE:
        raise DataError(
            f"float images must lie in [0, 1] (as ToTensor() gives), but these span [{lo:.3f}, {hi:.3f}]. If your "
            "transform normalises them, pass normalized_with=(mean, std) with the values of its Normalize, or drop Normalize: "
            "pqd normalises with statistics of the training images itself"
        )
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def _labels(y: Any, n: int) -> torch.Tensor:
    y = torch.as_tensor(y)
    if y.is_floating_point() or y.dtype == torch.bool or y.dim() != 1 or len(y) != n:
        raise DataError(f"labels must be {n} integer class indices, got {y.dtype} of shape {tuple(y.shape)}")
    return y.to(torch.int64).cpu()


def _batches(data: Any, batch_size: int):
    """Yield ``(images, labels)`` batches from a DataLoader, a map-style Dataset or an iterable."""
    from torch.utils.data import DataLoader
    from torch.utils.data import Dataset as TorchDataset

    if isinstance(data, TorchDataset) and not isinstance(data, torch.utils.data.IterableDataset):
        data = DataLoader(data, batch_size=batch_size, shuffle=False)
    elif isinstance(data, torch.utils.data.IterableDataset):
        data = DataLoader(data, batch_size=batch_size)
    try:
        it = iter(data)
    except TypeError:
        raise DataError(
            f"cannot read images from a {type(data).__name__}: pass a torch Dataset or DataLoader yielding (image, label), "
            "an (images, labels) pair of tensors, or a pqd Splits/Dataset"
        ) from None
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except TypeError as exc:  # default_collate on PIL images and other non-tensors
            raise DataError(
                f"cannot batch the samples of {type(data).__name__} ({exc}). Return tensors: add torchvision's "
                "transforms.PILToTensor() (uint8) or ToTensor() (float in [0, 1]) to its transform"
            ) from None
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise DataError(f"each batch must be (images, labels, ...), got a {type(batch).__name__}")
        yield batch[0], batch[1]


def as_dataset(
    data: Any,
    *,
    classes: Sequence[str] | None = None,
    normalized_with: tuple[Sequence[float], Sequence[float]] | None = None,
    batch_size: int = 256,
) -> Dataset:
    """A :class:`pqd.data.Dataset` holding every image of ``data`` in order (uint8 in memory).

    ``data``: a pqd Dataset (returned as is), an ``(images, labels)`` tuple of tensors, a
    ``torch.utils.data.Dataset`` of ``(image, label)`` samples, or a ``DataLoader`` (read once,
    in its order; use one without shuffling for evaluation). ``classes`` default to the data's
    ``classes`` attribute, else ``"0" .. str(max label)``.
    """
    if isinstance(data, Dataset):
        return data
    if isinstance(data, Splits):
        raise DataError("as_dataset got a Splits; pass one of its datasets (e.g. splits.test)")
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        pairs = [(data[0], data[1])]
    else:
        pairs = list(_batches(data, batch_size))
    if not pairs:
        raise DataError(f"{type(data).__name__} holds no images")
    xs, ys = [], []
    for x, y in pairs:
        if not isinstance(x, torch.Tensor):
            raise DataError(
                f"images must be tensors, got {type(x).__name__}; add transforms.PILToTensor() or ToTensor()"
            )
        xs.append(_to_uint8(x, normalized_with))
        ys.append(_labels(y, len(x)))
    x, y = torch.cat(xs), torch.cat(ys)
    if int(y.min()) < 0:
        raise DataError(f"labels must be >= 0, got {int(y.min())}")
    if classes is None:
        found = getattr(data, "classes", None) or getattr(getattr(data, "dataset", None), "classes", None)
        classes = tuple(str(c) for c in found) if found else tuple(str(i) for i in range(int(y.max()) + 1))
    if int(y.max()) >= len(classes):
        raise DataError(f"label {int(y.max())} is outside the {len(classes)} classes {tuple(classes)[:10]}")
    return Dataset(x.contiguous(), y, tuple(classes))


def require_splits(data: Any, *, where: str) -> Splits:
    """``data`` when it is a :class:`pqd.data.Splits`; anything else (a ``DataLoader``, a
    dataset...) is refused with a :class:`DataError` that names the adapter, instead of an
    ``AttributeError`` deep inside training."""
    if isinstance(data, Splits):
        return data
    raise DataError(
        f"{where} takes a pqd.data.Splits, got a {type(data).__module__}.{type(data).__name__}; wrap your data "
        "with pqd.data.adapters.as_splits(train_loader, test=test_loader) first"
    )


def as_splits(
    train: Any,
    *,
    test: Any = None,
    val: Any = None,
    classes: Sequence[str] | None = None,
    normalized_with: tuple[Sequence[float], Sequence[float]] | None = None,
    augment: bool = False,
    hflip: bool = False,
    name: str = "user",
) -> Splits:
    """:class:`pqd.data.Splits` from user data (a Splits is returned as is). Each of ``train``,
    ``test``, ``val`` is anything :func:`as_dataset` takes; without ``test`` the test split is
    empty.

    The model gets the user's tensors unchanged: ``[0, 1]`` floats as they are (uint8 images as
    ``x / 255``), images normalised with ``normalized_with=(mean, std)`` normalised the same way
    again, so a model trained on the result takes the user's loader's batches as they come
    (``pqd.integrations.evaluation.evaluate``). Nothing is augmented unless asked: ``augment``
    turns on random crops, ``hflip`` (with ``augment``) random horizontal flips."""
    if isinstance(train, Splits):
        return train
    if train is None:
        raise DataError(
            "pqd needs training data: pass a Splits, a torch Dataset or DataLoader, or (images, labels) tensors"
        )
    tr = as_dataset(train, classes=classes, normalized_with=normalized_with)
    classes = tr.classes
    te = (
        as_dataset(test, classes=classes, normalized_with=normalized_with)
        if test is not None
        else tr.subset(torch.zeros(0, dtype=torch.int64))
    )
    va = as_dataset(val, classes=classes, normalized_with=normalized_with) if val is not None else None
    for label, ds in (("test", te), ("val", va)):
        if ds is not None and len(ds) and ds.x.shape[1:] != tr.x.shape[1:]:
            raise DataError(
                f"{label} images are {tuple(ds.x.shape[1:])} but training images are {tuple(tr.x.shape[1:])}"
            )
    c = int(tr.x.shape[1])
    mean, std = (
        (tuple(map(float, normalized_with[0])), tuple(map(float, normalized_with[1])))
        if normalized_with is not None
        else ((0.0,) * c, (1.0,) * c)
    )
    return Splits(name, tr, va, te, mean, std, hflip, augment=augment)
