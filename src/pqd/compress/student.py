from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pqd.compress import qat
from pqd.compress.qoptions import MODES
from pqd.errors import ModelError

FORMS = ("fp32", *MODES)


@dataclass
class Student:
    """The model being compressed, in its current form.

    ``masks`` maps a module path to the bool mask of that module's weight (empty until
    pruned); ``form`` is 'fp32', 'qat' (fake-quantized, trainable), 'ptq' (calibrated) or 'dynamic'
    (weights-only PTQ of the Linear layers, :mod:`pqd.compress.qoptions`).
    ``freeze_fraction``: in 'qat' form, every training stage freezes observers and BN
    statistics for this last fraction of its epochs. ``records``: JSON-able facts a stage
    wants kept in the run's metrics, keyed by stage label.
    """

    model: nn.Module
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    form: str = "fp32"
    freeze_fraction: float = 0.25
    records: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.form not in FORMS:
            raise ValueError(f"Student.form must be one of {FORMS}, got {self.form!r}")

    @property
    def quantized(self) -> bool:
        return self.form != "fp32"

    @property
    def device(self) -> torch.device:
        return qat.model_device(self.model)


def chain(*hooks: Callable[[int], None] | None) -> Callable[[int], None] | None:
    """Combine ``before_epoch`` hooks (``None`` entries are skipped)."""
    live = [h for h in hooks if h is not None]

    def run(epoch: int) -> None:
        for h in live:
            h(epoch)

    return run if live else None


def convert_student(student: Student) -> nn.Module:
    """A quantized student as a real INT8 model that runs on x86 integer kernels (CPU):
    :func:`pqd.compress.qat.convert` of its model with its masks re-applied."""
    if not student.quantized:
        raise ModelError("convert needs a quantized student (run the quantize stage first)")
    return qat.convert(student.model, masks=student.masks)


def qat_epoch_hook(student: Student, epochs: int, check: qat.FreezeCheck | None = None):
    """``before_epoch`` hook for any stage that trains a fake-quant student: observers and BN
    statistics update until the last ``student.freeze_fraction`` of the epochs, then freeze.

    Frozen BN removes the scale invariance that BN gives the weights, so training with it
    frozen tolerates only a small learning rate, which the cosine schedule's tail gives only when the
    stage is long enough (see docs/TROUBLESHOOTING.md, "Training that went wrong"). ``check``
    (:class:`pqd.compress.qat.FreezeCheck`) is started at the freeze boundary.
    """
    if student.form != "qat":
        return None
    freeze_from = epochs - int(round(student.freeze_fraction * epochs))

    def hook(epoch: int) -> None:
        if check is not None and epoch == freeze_from:
            check.start()  # freezes, and measures the held-out batch at the boundary
        (qat.freeze if epoch >= freeze_from else qat.unfreeze)(student.model)

    return hook
