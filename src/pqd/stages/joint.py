"""Joint (simultaneous) compression, JPQD-like: pruning, fake quantization and response KD in
one training loop, as one stage (name 'joint', letter 'J').

The student is prepared for QAT first (the ``quantize`` section's weight scheme and
``reduce_range``), then trained for the stage's epochs with

* global magnitude pruning whose target follows the AGP cubic ramp
  (:func:`pqd.sparsity.sparsity_at`, ``joint.sparsity`` reached after ``joint.prune_fraction``
  of the epochs), masks re-applied after every optimizer step;
* fake quantization throughout, observers and BN statistics frozen for the last
  ``quantize.freeze_fraction`` of the epochs (as in the quantize stage);
* the loss ``T² · KL(teacher ‖ student at temperature T) + alpha · CE`` against the dense
  FP32 teacher (:class:`pqd.kd.KDLoss`), or plain CE with ``joint.kd: false``.

The result is a QAT student (form 'qat'), so the run exports INT8 like any quantized run. Set
against a sequential order ('P:a,Q:b,D:c') at the same total epochs (a+b+c) it isolates
"all at once" vs "one after another".

Python API: ``joint(student, config.joint, quantize=config.quantize, teacher=..., data=..., epochs=...)``.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from pqd.config import JointConfig, QuantizeConfig, RunConfig, TrainConfig
from pqd.data import Splits
from pqd.data.adapters import as_splits
from pqd.errors import ModelError
from pqd.kd import KDLoss
from pqd.qat import freeze, model_device, prepare
from pqd.qoptions import quant_options
from pqd.sparsity import GlobalPruner, MagnitudeImportance, Masks, sparsity_at
from pqd.stages.common import Student, chain
from pqd.stages.quantize import qat_epoch_hook
from pqd.train.loop import train

if TYPE_CHECKING:  # the stage registry imports the stage modules: for annotations only
    from pqd.stages.registry import StageContext

__all__ = ["JointStage", "joint"]

log = logging.getLogger("pqd.joint")


def joint(
    student: Student, config: JointConfig, *, quantize: QuantizeConfig = QuantizeConfig(), teacher: nn.Module | None,
    data: Splits, epochs: int, train_config: TrainConfig = TrainConfig(), checkpoint: str | Path | None = None,
    seed: int = 0, augment: bool = True,
) -> Student:
    """Prune (AGP) + fake-quantize + distill ``student`` at once for ``epochs``; returns a QAT student.
    The input model is not modified (QAT preparation copies it)."""
    if student.quantized:
        raise ModelError("joint quantizes the student, and it is already quantized; a student is quantized once")
    if epochs < 1:
        raise ModelError("joint trains: give it at least one epoch")
    if config.kd and teacher is None:
        raise ModelError("joint.kd is on but there is no teacher; pass teacher= or set joint.kd: false")
    data = as_splits(data)
    model = prepare(student.model, torch.zeros(2, *data.image_shape), mode="qat", reduce_range=quantize.reduce_range,
                    options=quant_options(quantize))
    masks = Masks(model, student.masks)
    masks.apply()
    out = replace(student, model=model, masks=dict(masks), form="qat", freeze_fraction=quantize.freeze_fraction)
    pruner = GlobalPruner(model, importance=MagnitudeImportance(), exclude=config.exclude, masks=masks)

    def prune_hook(epoch: int) -> None:
        target = sparsity_at(epoch, epochs=epochs, target=config.sparsity, prune_fraction=config.prune_fraction)
        pruner.update(target)
        log.info("joint epoch %d: target sparsity %.4f", epoch + 1, target)

    loss_fn = None
    if config.kd and teacher is not None:  # kd without a teacher raised above
        teacher.eval()
        kd = KDLoss(temperature=config.temperature, alpha=config.alpha)
        t_dev = model_device(teacher)

        def loss_fn(logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                t = teacher(x.to(t_dev))
            out: torch.Tensor = kd(logits, t, y)
            return out

    train(model, data, epochs=epochs, lr=config.lr, config=train_config, loss_fn=loss_fn, masks=pruner.masks,
          before_epoch=chain(qat_epoch_hook(out, epochs), prune_hook), checkpoint=checkpoint, seed=seed, tag="joint",
          amp=False, augment=augment)
    freeze(model)
    out.masks = dict(pruner.masks)
    out.records = dict(out.records) | {"joint": {"target_sparsity": config.sparsity, "kd": config.kd,
                                                 "weights": quant_options(quantize).label()}}
    return out


class JointStage:
    """Registry adapter: stage 'joint' / 'J', section 'joint', quantizes the student."""

    name = "joint"
    letter = "J"
    section = "joint"
    quantizes = True
    structural = False
    aliases = ("jpqd",)

    def preflight(self, model: nn.Module, config: RunConfig, example: torch.Tensor) -> None:
        from pqd.sparsity import prunable_layers

        prunable_layers(model, config.joint.exclude)
        prepare(model, example, mode="qat", reduce_range=config.quantize.reduce_range, options=quant_options(config.quantize))

    def target_sparsity(self, config: RunConfig) -> float:
        return config.joint.sparsity

    def run(self, student: Student, ctx: StageContext, *, epochs: int, checkpoint: Path | None, index: int) -> Student:
        return joint(student, ctx.config.joint, quantize=ctx.config.quantize, teacher=ctx.teacher, data=ctx.data, epochs=epochs,
                     train_config=ctx.train_config, checkpoint=checkpoint, seed=ctx.seed, augment=ctx.augment)
