"""The prune stage: global unstructured pruning (magnitude, or random as a baseline), one-shot
or gradual with the cubic schedule of Zhu & Gupta (2017, "AGP"), while fine-tuning with pqd's
loop. The algorithm lives in :mod:`pqd.compress.sparsity`; this module only drives it."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from pqd.compress.qat import freeze
from pqd.compress.sparsity import GlobalPruner, global_sparsity, importance, prunable_layers, sparsity_at
from pqd.compress.student import Student, chain
from pqd.config import PruneConfig, TrainConfig
from pqd.data import Splits
from pqd.data.adapters import as_splits
from pqd.stages.quantize import qat_epoch_hook
from pqd.train.loop import epoch_seed, train
from pqd.train.tracking import Tracker

__all__ = ["compute_masks", "global_sparsity", "prunable_layers", "prune", "sparsity_at"]

log = logging.getLogger("pqd.prune")


def compute_masks(
    model: nn.Module, layers: list[str], sparsity: float, *, criterion: str = "magnitude",
    old: dict[str, torch.Tensor] | None = None, generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """One global threshold over all ``layers``: the ``sparsity`` fraction of lowest-scoring
    weights is pruned. Weights pruned before (``old``) stay pruned. ``model`` is not changed."""
    pruner = GlobalPruner(model, importance=importance(criterion), layers=layers, masks=old)
    return pruner.compute(sparsity, generator=generator)


def prune(
    student: Student, config: PruneConfig, *, data: Splits, epochs: int, train_config: TrainConfig = TrainConfig(),
    checkpoint: str | Path | None = None, seed: int = 0, augment: bool = True, tracker: Tracker | None = None,
) -> Student:
    """Prune ``student`` to ``config.sparsity`` (global, unstructured) while fine-tuning for
    ``epochs`` on the student's device. Works in any form (FP32 or fake-quant); returns the
    student with masks."""
    model = student.model
    pruner = GlobalPruner(model, importance=importance(config.criterion), exclude=config.exclude, masks=student.masks)

    def before_epoch(epoch: int) -> None:
        target = sparsity_at(epoch, epochs=epochs, target=config.sparsity, schedule=config.schedule, prune_fraction=config.prune_fraction)
        pruner.update(target, generator=torch.Generator().manual_seed(epoch_seed(seed, "prune-random", epoch)))
        log.info("prune epoch %d: target sparsity %.4f", epoch + 1, target)

    if epochs == 0:
        before_epoch(0)
    else:
        train(model, as_splits(data), epochs=epochs, lr=config.lr, config=train_config, masks=pruner.masks,
              before_epoch=chain(qat_epoch_hook(student, epochs), before_epoch),
              checkpoint=checkpoint, seed=seed, tag="prune", tracker=tracker, amp=not student.quantized, augment=augment)
    if student.quantized:
        freeze(model)
    return replace(student, model=model, masks=dict(pruner.masks))
