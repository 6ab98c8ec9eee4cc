"""The distill stage: response-based knowledge distillation (Hinton et al. 2015) from the dense
FP32 teacher with :class:`pqd.compress.kd.KDLoss`. The student trains in whatever form it has (sparse
and/or fake-quant), on its own device; the teacher runs on its own device."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pqd.compress.kd import KDLoss, distillation_loss
from pqd.compress.qat import freeze
from pqd.compress.student import Student, qat_epoch_hook
from pqd.config import Section, TrainConfig, choice, fail, in_range
from pqd.data import Splits
from pqd.data.adapters import as_splits
from pqd.errors import ConfigError
from pqd.stages.distill_variants import DEFAULT_BETA, NEEDS_TEACHER, distill_variant
from pqd.stages.protocol import RunConfig, Stage, StageContext, StageSpec, register_stage
from pqd.stages.quantize import freeze_check, note_freeze_check
from pqd.train.loop import train
from pqd.train.tracking import Tracker

__all__ = ["DistillConfig", "DistillStage", "distill"]


@dataclass(frozen=True)
class DistillConfig(Section):
    """Response-based KD: ``kd_weight · T² · KL(softmax(t/T) || softmax(s/T)) + alpha · CE``.

    ``kd_weight: 0`` is the KD-off control: the same stage, epochs, lr and schedule with the
    cross-entropy term alone and no teacher forward ("more training, no teacher").

    ``kind`` picks the KD variant (:mod:`pqd.compress.kd_variants`): 'response' (above), 'feature'
    (FitNets hints from ``layers``, 1x1 adapters where widths differ), 'attention' (attention
    transfer from ``layers``), 'mutual' (online mutual learning with ``peers`` randomly
    initialised peers; no teacher) or 'self' (self-distillation: auxiliary heads on ``layers``
    learn from the network's own final output). ``layers``: module paths ('' = automatic: the
    output of each top-level block). ``beta``: weight of the feature / attention / auxiliary term
    (default per kind: feature 1, attention 1000, self 1)."""

    temperature: float = 4.0
    alpha: float = 0.5
    lr: float = 0.005
    kind: str = "response"
    layers: tuple[str, ...] = ()
    beta: float | None = None
    peers: int = 1
    kd_weight: float = 1.0

    def __post_init__(self) -> None:
        choice("distill.kind", self.kind, ("response", *DEFAULT_BETA))
        if self.beta is not None:
            in_range("distill.beta", self.beta, 0.0)
        in_range("distill.peers", self.peers, 1, 8)
        in_range("distill.temperature", self.temperature, 0.1, 100.0)
        in_range("distill.alpha", self.alpha, 0.0)
        in_range("distill.lr", self.lr, 0.0)
        in_range("distill.kd_weight", self.kd_weight, 0.0)
        if self.kd_weight == 0 and self.alpha == 0:
            fail(
                "distill.kd_weight",
                "kd_weight 0 and alpha 0 together leave no loss; set alpha > 0 for the KD-off "
                "control (cross-entropy only) or kd_weight > 0",
            )


def distill(
    student: Student,
    config: DistillConfig,
    *,
    teacher: nn.Module | None,
    data: Splits,
    epochs: int,
    train_config: TrainConfig = TrainConfig(),
    checkpoint: str | Path | None = None,
    seed: int = 0,
    augment: bool = True,
    tracker: Tracker | None = None,
) -> Student:
    """Train ``student`` for ``epochs`` with the KD ``config.kind`` names: against the frozen ``teacher``'s
    soft targets ('response'), or one of :mod:`pqd.stages.distill_variants`' kinds (one entry point for all).

    ``config.kd_weight == 0`` is the KD-off control: same loop, lr and schedule, cross-entropy
    alone, and the teacher is never run.
    """
    if config.kind != "response":
        return distill_variant(
            student,
            config,
            teacher=teacher,
            data=data,
            epochs=epochs,
            train_config=train_config,
            checkpoint=checkpoint,
            seed=seed,
            augment=augment,
            tracker=tracker,
        )
    if teacher is None:
        raise ConfigError("distill: response KD needs the dense teacher")
    kd = KDLoss(temperature=config.temperature, alpha=config.alpha, kd_weight=config.kd_weight)
    if kd.needs_teacher and train_config.channels_last:
        teacher.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's stubs lack Module.to(memory_format=)
    loss = distillation_loss(kd, teacher)

    data = as_splits(data)
    check = freeze_check(student, data, lr_key="distill.lr")
    train(
        student.model,
        data,
        epochs=epochs,
        lr=config.lr,
        config=train_config,
        loss_fn=loss,
        masks=student.masks,
        before_epoch=qat_epoch_hook(student, epochs, check),
        checkpoint=checkpoint,
        seed=seed,
        tag="distill",
        lr_key="distill.lr",
        tracker=tracker,
        amp=not student.quantized,
        augment=augment,
    )
    note_freeze_check(student, check, tag="distill")
    if student.quantized:
        freeze(student.model)
    return student


class DistillStage(Stage):
    """Stage 'distill' / 'D' (alias 'kd'), section 'distill': response KD, or the variant ``distill.kind`` names."""

    name, letter, section, config_class = "distill", "D", "distill", DistillConfig
    aliases = ("kd",)

    def validate(self, config: RunConfig, spec: StageSpec) -> None:
        if spec.epochs == 0:
            fail("stages", "distill needs at least one epoch, e.g. 'D:10'")

    def run(
        self,
        student: Student,
        section_config: DistillConfig,
        ctx: StageContext,
        *,
        epochs: int,
        checkpoint: Path | None,
    ) -> Student:
        if section_config.kind in NEEDS_TEACHER and ctx.teacher is None:
            raise ConfigError(
                f"stages: distill.kind {section_config.kind!r} needs the dense teacher, and this context has none"
            )
        return distill(
            student,
            section_config,
            teacher=ctx.teacher,
            data=ctx.data,
            epochs=epochs,
            train_config=ctx.train_config,
            checkpoint=checkpoint,
            seed=ctx.seed,
            augment=ctx.augment,
            tracker=ctx.tracker,
        )


register_stage(DistillStage())
