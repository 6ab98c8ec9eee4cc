"""The datasets of a run: :class:`Splits` (in-memory :class:`pqd.data.base.Dataset` or streamed
:class:`pqd.data.stream.FileDataset`). Its own module so that neither container module imports the other's."""

from __future__ import annotations

from dataclasses import dataclass

from pqd.data.base import Dataset
from pqd.data.stream import FileDataset


@dataclass(frozen=True)
class Splits:
    """Train / optional val / test datasets plus train-set normalisation statistics.

    With ``data.image_size``: ``preprocess`` is the evaluation preprocessing the deployables carry
    (:func:`pqd.data.transforms.preprocess_record`), ``crop_scale`` the RandomResizedCrop area range of
    training, and the datasets may be :class:`pqd.data.stream.FileDataset` (streamed from disk)."""

    name: str
    train: Dataset | FileDataset
    val: Dataset | FileDataset | None
    test: Dataset | FileDataset
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool
    preprocess: dict | None = None
    crop_scale: tuple[float, float] | None = None
    augment: bool = True  # whether training may augment these images (random crops, and flips if ``hflip``)

    @property
    def num_classes(self) -> int:
        return len(self.train.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.train.image_shape
