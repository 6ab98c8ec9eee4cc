"""Response-based knowledge distillation (Hinton et al. 2015) from the dense FP32 teacher.
The student trains in whatever form it has (sparse and/or fake-quant)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pqd.config import DistillConfig, TrainConfig
from pqd.data import Splits
from pqd.stages.common import Student, chain
from pqd.stages.quantize import freeze, qat_epoch_hook
from pqd.train.loop import train


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, *, temperature: float, alpha: float) -> torch.Tensor:
    """``T² · KL(softmax(t/T) ‖ softmax(s/T)) + alpha · CE(s, y)``."""
    t = temperature
    kl = F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1), reduction="batchmean", log_target=True)
    return kl * t * t + alpha * F.cross_entropy(student_logits, target)


def distill(
    student: Student, config: DistillConfig, *, teacher: nn.Module, data: Splits, epochs: int,
    train_config: TrainConfig = TrainConfig(), checkpoint: str | Path | None = None, seed: int = 0, augment: bool = True,
) -> Student:
    """Train ``student`` for ``epochs`` against the frozen ``teacher``'s soft targets."""
    teacher.eval()
    if train_config.channels_last:
        teacher.to(memory_format=torch.channels_last)

    def loss(logits, x, y):
        with torch.no_grad():
            t_logits = teacher(x).float()
        return kd_loss(logits, t_logits, y, temperature=config.temperature, alpha=config.alpha)

    train(student.model, data, epochs=epochs, lr=config.lr, config=train_config, loss_fn=loss, masks=student.masks,
          before_epoch=qat_epoch_hook(student, epochs), checkpoint=checkpoint, seed=seed, tag="distill",
          amp=not student.quantized, augment=augment)
    if student.quantized:
        freeze(student.model)
    return student
