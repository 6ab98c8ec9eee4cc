"""Core containers: an in-memory :class:`Dataset` (one uint8 tensor) and :class:`Splits`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

log = logging.getLogger("pqd.data")


@dataclass(frozen=True)
class Dataset:
    """Images ``x`` (uint8 ``[N, C, H, W]``, contiguous), labels ``y`` (int64 ``[N]``), class names."""

    x: torch.Tensor
    y: torch.Tensor
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.x.dtype != torch.uint8 or self.x.dim() != 4:
            raise ValueError(f"Dataset.x must be uint8 [N, C, H, W], got {self.x.dtype} {tuple(self.x.shape)}")
        if self.y.dtype != torch.int64 or self.y.shape != (self.x.shape[0],):
            raise ValueError(f"Dataset.y must be int64 [{self.x.shape[0]}], got {self.y.dtype} {tuple(self.y.shape)}")
        object.__setattr__(self, "x", self.x.contiguous())
        object.__setattr__(self, "classes", tuple(self.classes))
        if len(self.y) and not (0 <= int(self.y.min()) and int(self.y.max()) < len(self.classes)):
            raise ValueError(f"Dataset.y has labels outside [0, {len(self.classes)})")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def subset(self, index: torch.Tensor | np.ndarray) -> Dataset:
        """The images at ``index`` (in that order), as a new contiguous Dataset."""
        index = torch.as_tensor(index, dtype=torch.int64)
        return Dataset(self.x[index].contiguous(), self.y[index].clone(), self.classes)

    def class_counts(self) -> list[int]:
        return torch.bincount(self.y, minlength=len(self.classes)).tolist()


@dataclass(frozen=True)
class Splits:
    """Train / optional val / test datasets plus train-set normalisation statistics."""

    name: str
    train: Dataset
    val: Dataset | None
    test: Dataset
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool

    @property
    def num_classes(self) -> int:
        return len(self.train.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.train.x.shape[1:]
        return (int(c), int(h), int(w))


class Raw(NamedTuple):
    """Decoded source data as numpy arrays: uint8 NCHW images and int64 labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...]

    def to_datasets(self) -> tuple[Dataset, Dataset]:
        def ds(x: np.ndarray, y: np.ndarray) -> Dataset:
            return Dataset(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y.astype(np.int64)), self.classes)

        return ds(self.x_train, self.y_train), ds(self.x_test, self.y_test)
