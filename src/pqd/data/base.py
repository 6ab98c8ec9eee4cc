"""Core containers: an in-memory :class:`Dataset` (one uint8 tensor) and decoded :class:`Raw` data
(:class:`pqd.data.splits.Splits` holds the datasets of a run)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from pqd.errors import DataError

log = logging.getLogger("pqd.data")


@dataclass(frozen=True)
class Dataset:
    """Images ``x`` (uint8 ``[N, C, H, W]``, contiguous), labels ``y`` (int64 ``[N]``), class names.

    ``x`` and ``y`` stay on the CPU; :meth:`on_device` keeps one copy per accelerator for
    device-resident batching (:func:`pqd.data.batches`), freed with the Dataset.
    """

    x: torch.Tensor
    y: torch.Tensor
    classes: tuple[str, ...]
    _device_copies: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.x.dtype != torch.uint8 or self.x.dim() != 4:
            raise DataError(
                f"Dataset.x must be uint8 [N, C, H, W], got {self.x.dtype} {tuple(self.x.shape)}; for float images "
                "or a DataLoader use pqd.data.adapters.as_dataset / as_splits, which convert them"
            )
        if self.y.dtype != torch.int64 or self.y.shape != (self.x.shape[0],):
            raise DataError(f"Dataset.y must be int64 [{self.x.shape[0]}], got {self.y.dtype} {tuple(self.y.shape)}")
        object.__setattr__(self, "x", self.x.contiguous())
        object.__setattr__(self, "classes", tuple(self.classes))
        if len(self.y) and not (int(self.y.min()) >= 0 and int(self.y.max()) < len(self.classes)):
            raise DataError(f"Dataset.y has labels outside [0, {len(self.classes)})")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.x.shape[1:]
        return (int(c), int(h), int(w))

    @property
    def nbytes(self) -> int:
        """Bytes of images plus labels (what a device-resident copy occupies)."""
        return self.x.numel() * self.x.element_size() + self.y.numel() * self.y.element_size()

    def on_device(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` on ``device``: copied once per device and kept (the CPU tensors themselves on CPU)."""
        device = torch.device(device)
        if device.type == "cpu":
            return self.x, self.y
        key = _device_key(device)
        if key not in self._device_copies:
            log.debug("copying %d images (%.1f MB) to %s once", len(self), self.nbytes / 1e6, key)
            self._device_copies[key] = (self.x.to(device), self.y.to(device))
        return self._device_copies[key]

    def has_device_copy(self, device: torch.device | str) -> bool:
        """Whether :meth:`on_device` already holds a copy on ``device``."""
        return _device_key(torch.device(device)) in self._device_copies

    def drop_device_copies(self) -> None:
        """Free the copies :meth:`on_device` made."""
        self._device_copies.clear()

    def subset(self, index: torch.Tensor | np.ndarray) -> Dataset:
        """The images at ``index`` (in that order), as a new contiguous Dataset."""
        index = torch.as_tensor(index, dtype=torch.int64)
        return Dataset(self.x[index].contiguous(), self.y[index].clone(), self.classes)

    def class_counts(self) -> list[int]:
        return torch.bincount(self.y, minlength=len(self.classes)).tolist()


def _device_key(device: torch.device) -> str:
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


class Raw(NamedTuple):
    """Decoded source data as numpy arrays: uint8 NCHW images and int64 labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...]

    def to_datasets(self) -> tuple[Dataset, Dataset]:
        def ds(x: np.ndarray, y: np.ndarray) -> Dataset:
            return Dataset(
                torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y.astype(np.int64)), self.classes
            )

        return ds(self.x_train, self.y_train), ds(self.x_test, self.y_test)
