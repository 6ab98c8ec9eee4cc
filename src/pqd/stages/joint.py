"""Joint (simultaneous) compression, JPQD-like: pruning, fake quantization and response KD in
one training loop, as one stage (name 'joint', letter 'J').

The student is prepared for QAT first (the ``quantize`` section's weight scheme and
``reduce_range``), then trained for the stage's epochs with

* global magnitude pruning whose target follows the AGP cubic ramp
  (:func:`pqd.compress.sparsity.sparsity_at`, ``joint.sparsity`` reached after ``joint.prune_fraction``
  of the epochs), masks re-applied after every optimizer step;
* fake quantization throughout, observers and BN statistics frozen for the last
  ``quantize.freeze_fraction`` of the epochs (as in the quantize stage);
* the loss ``T² · KL(teacher ‖ student at temperature T) + alpha · CE`` against the dense
  FP32 teacher (:class:`pqd.compress.kd.KDLoss`), or plain CE with ``joint.kd: false``.

The result is a QAT student (form 'qat'), so the run exports INT8 like any quantized run. Set
against a sequential order ('P:a,Q:b,D:c') at the same total epochs (a+b+c) it isolates
"all at once" vs "one after another".

Python API: ``joint(student, config.joint, quantize=config.quantize, teacher=..., data=..., epochs=...)``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from pqd.compress.kd import KDLoss, distillation_loss
from pqd.compress.qat import freeze, prepare
from pqd.compress.qoptions import quant_options
from pqd.compress.sparsity import (
    DEFAULT_EXCLUDE,
    GlobalPruner,
    MagnitudeImportance,
    Masks,
    prunable_layers,
    sparsity_at,
)
from pqd.compress.student import Student, chain, qat_epoch_hook
from pqd.config import Section, TrainConfig, fail, in_range
from pqd.data import Splits
from pqd.data.adapters import as_splits
from pqd.errors import ModelError
from pqd.stages.protocol import RunConfig, Stage, StageContext, StageSpec, register_stage
from pqd.stages.quantize import QuantizeConfig
from pqd.train.loop import train
from pqd.train.tracking import Tracker

__all__ = ["JointStage", "joint"]

log = logging.getLogger("pqd.joint")


@dataclass(frozen=True)
class JointConfig(Section):
    """Joint compression (JPQD-like; stage 'joint' / 'J'): in one training loop, global magnitude
    pruning on the AGP schedule (``sparsity``, ``prune_fraction``, ``exclude`` as in ``prune``),
    fake quantization (the ``quantize`` section's scheme) and response KD from the teacher
    (``temperature``; ``alpha`` weighs the hard-label CE; ``kd: false`` trains on labels only)."""

    sparsity: float = 0.9
    prune_fraction: float = 0.75
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    lr: float = 0.005
    kd: bool = True
    temperature: float = 4.0
    alpha: float = 0.5

    def __post_init__(self) -> None:
        in_range("joint.sparsity", self.sparsity, 0.0, 1.0, hi_open=True)
        in_range("joint.prune_fraction", self.prune_fraction, 0.0, 1.0)
        in_range("joint.lr", self.lr, 0.0)
        in_range("joint.temperature", self.temperature, 0.1, 100.0)
        in_range("joint.alpha", self.alpha, 0.0)


def joint(
    student: Student,
    config: JointConfig,
    *,
    quantize: QuantizeConfig | None = None,
    teacher: nn.Module | None,
    data: Splits,
    epochs: int,
    train_config: TrainConfig = TrainConfig(),
    checkpoint: str | Path | None = None,
    seed: int = 0,
    augment: bool = True,
    tracker: Tracker | None = None,
) -> Student:
    """Prune (AGP) + fake-quantize + distill ``student`` at once for ``epochs``; returns a QAT student.
    The input model is not modified (QAT preparation copies it)."""
    if student.quantized:
        raise ModelError("joint quantizes the student, and it is already quantized; a student is quantized once")
    if epochs < 1:
        raise ModelError("joint trains: give it at least one epoch")
    if config.kd and teacher is None:
        raise ModelError("joint.kd is on but there is no teacher; pass teacher= or set joint.kd: false")
    quantize = quantize or QuantizeConfig()
    data = as_splits(data)
    model = prepare(
        student.model,
        torch.zeros(2, *data.image_shape),
        mode="qat",
        reduce_range=quantize.reduce_range,
        options=quant_options(quantize),
    )
    masks = Masks(model, student.masks)
    masks.apply()
    out = replace(student, model=model, masks=dict(masks), form="qat", freeze_fraction=quantize.freeze_fraction)
    pruner = GlobalPruner(model, importance=MagnitudeImportance(), exclude=config.exclude, masks=masks)

    def prune_hook(epoch: int) -> None:
        target = sparsity_at(epoch, epochs=epochs, target=config.sparsity, prune_fraction=config.prune_fraction)
        pruner.update(target)
        log.info("joint epoch %d: target sparsity %.4f", epoch + 1, target)

    loss_fn = None
    if config.kd:
        loss_fn = distillation_loss(KDLoss(temperature=config.temperature, alpha=config.alpha), teacher)

    train(
        model,
        data,
        epochs=epochs,
        lr=config.lr,
        config=train_config,
        loss_fn=loss_fn,
        masks=pruner.masks,
        before_epoch=chain(qat_epoch_hook(out, epochs), prune_hook),
        checkpoint=checkpoint,
        seed=seed,
        tag="joint",
        lr_key="joint.lr",
        tracker=tracker,
        amp=False,
        augment=augment,
    )
    freeze(model)
    out.masks = dict(pruner.masks)
    out.records = dict(out.records) | {
        "joint": {"target_sparsity": config.sparsity, "kd": config.kd, "weights": quant_options(quantize).label()}
    }
    return out


class JointStage(Stage):
    """Stage 'joint' / 'J' (alias 'jpqd'), section 'joint'; quantizes the student."""

    name, letter, section, config_class = "joint", "J", "joint", JointConfig
    quantizes = True
    aliases = ("jpqd",)

    def validate(self, config: RunConfig, spec: StageSpec) -> None:
        if config.quantize.mode == "dynamic":
            fail("quantize.mode", "the joint stage trains with fake quantization; use mode 'qat' (or 'ptq') with it")
        if spec.epochs == 0:
            fail("stages", f"{self.name} trains, so it needs epochs, e.g. '{self.letter}:6'")

    def preflight(self, model: nn.Module, config: RunConfig, example: torch.Tensor) -> None:
        prunable_layers(model, config.joint.exclude)
        prepare(
            model,
            example,
            mode="qat",
            reduce_range=config.quantize.reduce_range,
            options=quant_options(config.quantize),
        )

    def target_sparsity(self, section_config: JointConfig) -> float:
        return section_config.sparsity

    def prune_criterion(self, section_config: JointConfig) -> str:
        return "magnitude"

    def prune_exclude(self, section_config: JointConfig) -> tuple[str, ...]:
        return section_config.exclude

    def run(
        self, student: Student, section_config: JointConfig, ctx: StageContext, *, epochs: int, checkpoint: Path | None
    ) -> Student:
        return joint(
            student,
            section_config,
            quantize=ctx.config.quantize,
            teacher=ctx.teacher,
            data=ctx.data,
            epochs=epochs,
            train_config=ctx.train_config,
            checkpoint=checkpoint,
            seed=ctx.seed,
            augment=ctx.augment,
            tracker=ctx.tracker,
        )


register_stage(JointStage())
