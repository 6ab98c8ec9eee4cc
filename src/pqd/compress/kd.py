"""Response-based knowledge distillation (Hinton et al. 2015) as a loss module."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pqd.compress.qat import model_device
from pqd.errors import ConfigError

__all__ = ["KDLoss", "distillation_loss", "kd_loss", "teacher_logits"]


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    target: torch.Tensor,
    *,
    temperature: float,
    alpha: float,
    kd_weight: float = 1.0,
) -> torch.Tensor:
    """``kd_weight · T² · KL(softmax(t/T) ‖ softmax(s/T)) + alpha · CE(s, y)``.

    With ``kd_weight == 0`` the teacher term is left out entirely (``teacher_logits`` may be None).
    """
    ce = alpha * F.cross_entropy(student_logits, target)
    if kd_weight == 0:
        return ce
    if teacher_logits is None:
        raise ValueError("kd_loss: teacher_logits is None but kd_weight is not 0")
    t = temperature
    kl = F.kl_div(
        F.log_softmax(student_logits / t, dim=1),
        F.log_softmax(teacher_logits / t, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    return kd_weight * kl * t * t + ce


class KDLoss(nn.Module):
    """``loss = KDLoss(temperature=4.0, alpha=0.5)``; ``loss(student_logits, teacher_logits, labels)``
    is ``T² · KL(softmax(t/T) ‖ softmax(s/T)) + alpha · CE(s, labels)``. Teacher logits are
    detached and brought to the student's device."""

    def __init__(self, *, temperature: float = 4.0, alpha: float = 0.5, kd_weight: float = 1.0):
        super().__init__()
        if not 0.1 <= temperature <= 100.0:
            raise ConfigError(f"KDLoss temperature must be in [0.1, 100], got {temperature}")
        if alpha < 0:
            raise ConfigError(f"KDLoss alpha must be >= 0, got {alpha}")
        if kd_weight < 0:
            raise ConfigError(f"KDLoss kd_weight must be >= 0, got {kd_weight}")
        if kd_weight == 0 and alpha == 0:
            raise ConfigError("KDLoss kd_weight 0 and alpha 0 together leave no loss")
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.kd_weight = float(kd_weight)

    @property
    def needs_teacher(self) -> bool:
        """False for the KD-off control (``kd_weight == 0``): no teacher forward is needed."""
        return self.kd_weight != 0

    def soft(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """The distillation term alone: ``T² · KL(softmax(t/T) ‖ softmax(s/T))``."""
        t = self.temperature
        teacher_logits = teacher_logits.detach().to(device=student_logits.device, dtype=torch.float32)
        kl = F.kl_div(
            F.log_softmax(student_logits.float() / t, dim=1),
            F.log_softmax(teacher_logits / t, dim=1),
            reduction="batchmean",
            log_target=True,
        )
        return self.kd_weight * kl * t * t

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, target: torch.Tensor
    ) -> torch.Tensor:
        if teacher_logits is not None:
            teacher_logits = teacher_logits.detach().to(device=student_logits.device, dtype=torch.float32)
        return kd_loss(
            student_logits.float(),
            teacher_logits,
            target,
            temperature=self.temperature,
            alpha=self.alpha,
            kd_weight=self.kd_weight,
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, alpha={self.alpha}, kd_weight={self.kd_weight}"


def teacher_logits(teacher: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The teacher's logits for ``images``, moved to the teacher's device, without gradients."""
    with torch.no_grad():
        logits: torch.Tensor = teacher(images.to(model_device(teacher)))
    return logits


def distillation_loss(
    kd: KDLoss, teacher: nn.Module | None
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The training loop's loss ``(logits, images, labels) -> loss`` for ``kd`` against ``teacher``
    (put in eval mode). With ``kd.kd_weight == 0`` (the KD-off control) the teacher is never run."""
    if not kd.needs_teacher:
        return lambda logits, x, y: kd(logits, None, y)
    if teacher is None:
        raise ConfigError("distillation needs the dense teacher (kd_weight > 0), and none was given")
    teacher.eval()
    return lambda logits, x, y: kd(logits, teacher_logits(teacher, x), y)
