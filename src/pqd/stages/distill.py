"""The distill stage: response-based knowledge distillation (Hinton et al. 2015) from the dense
FP32 teacher with :class:`pqd.kd.KDLoss`. The student trains in whatever form it has (sparse
and/or fake-quant), on its own device; the teacher runs on its own device."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pqd.config import DistillConfig, TrainConfig
from pqd.data import Splits
from pqd.data.adapters import as_splits
from pqd.integrations.tracking import Tracker
from pqd.kd import KDLoss, kd_loss
from pqd.qat import freeze, model_device
from pqd.stages.common import Student
from pqd.stages.quantize import freeze_check, note_freeze_check, qat_epoch_hook
from pqd.train.loop import train

__all__ = ["distill", "kd_loss"]


def distill(
    student: Student, config: DistillConfig, *, teacher: nn.Module, data: Splits, epochs: int,
    train_config: TrainConfig = TrainConfig(), checkpoint: str | Path | None = None, seed: int = 0, augment: bool = True,
    tracker: Tracker | None = None,
) -> Student:
    """Train ``student`` for ``epochs`` against the frozen ``teacher``'s soft targets.

    ``config.kd_weight == 0`` is the KD-off control: same loop, lr and schedule, cross-entropy
    alone, and the teacher is never run.
    """
    kd = KDLoss(temperature=config.temperature, alpha=config.alpha, kd_weight=config.kd_weight)
    if kd.needs_teacher:
        teacher.eval()
        if train_config.channels_last:
            teacher.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # Module.to takes memory_format; torch's overloads omit it
        teacher_device = model_device(teacher)

    def loss(logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t_logits = None
        if kd.needs_teacher:
            with torch.no_grad():
                t_logits = teacher(x.to(teacher_device))
        out: torch.Tensor = kd(logits, t_logits, y)
        return out

    data = as_splits(data)
    check = freeze_check(student, data, lr_key="distill.lr")
    train(student.model, data, epochs=epochs, lr=config.lr, config=train_config, loss_fn=loss, masks=student.masks,
          before_epoch=qat_epoch_hook(student, epochs, check), checkpoint=checkpoint, seed=seed, tag="distill", tracker=tracker,
          amp=not student.quantized, augment=augment)
    note_freeze_check(student, check, tag="distill")
    if student.quantized:
        freeze(student.model)
    return student
