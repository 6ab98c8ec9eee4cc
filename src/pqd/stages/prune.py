"""The prune stage: global unstructured pruning (magnitude, or random as a baseline), one-shot
or gradual with the cubic schedule of Zhu & Gupta (2017, "AGP"), while fine-tuning with pqd's
loop. The algorithm lives in :mod:`pqd.compress.sparsity`; this module only drives it."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from pqd.compress.qat import freeze
from pqd.compress.sparsity import (
    DEFAULT_EXCLUDE,
    GlobalPruner,
    global_sparsity,
    importance,
    prunable_layers,
    sparsity_at,
)
from pqd.compress.student import Student, chain, qat_epoch_hook
from pqd.config import Section, TrainConfig, choice, fail, in_range
from pqd.data import Splits
from pqd.data.adapters import as_splits
from pqd.stages.protocol import RunConfig, Stage, StageContext, StageSpec, register_stage
from pqd.train.loop import epoch_seed, train
from pqd.train.tracking import Tracker

__all__ = ["compute_masks", "global_sparsity", "prunable_layers", "prune", "sparsity_at"]

log = logging.getLogger("pqd.prune")


@dataclass(frozen=True)
class PruneConfig(Section):
    """Global unstructured pruning of conv/linear weights.

    ``schedule``: 'gradual' (cubic AGP over the stage's epochs) or 'oneshot'.
    ``criterion``: 'magnitude' or 'random' (baseline). ``exclude``: module-name globs;
    '@first' / '@last' name the first / last prunable layer.
    """

    sparsity: float = 0.9
    schedule: str = "gradual"
    criterion: str = "magnitude"
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    lr: float = 0.01
    prune_fraction: float = 0.75

    def __post_init__(self) -> None:
        in_range("prune.sparsity", self.sparsity, 0.0, 1.0, hi_open=True)
        choice("prune.schedule", self.schedule, ("gradual", "oneshot"))
        choice("prune.criterion", self.criterion, ("magnitude", "random"))
        in_range("prune.lr", self.lr, 0.0)
        in_range("prune.prune_fraction", self.prune_fraction, 0.0, 1.0)


def compute_masks(
    model: nn.Module,
    layers: list[str],
    sparsity: float,
    *,
    criterion: str = "magnitude",
    old: dict[str, torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """One global threshold over all ``layers``: the ``sparsity`` fraction of lowest-scoring
    weights is pruned. Weights pruned before (``old``) stay pruned. ``model`` is not changed."""
    pruner = GlobalPruner(model, importance=importance(criterion), layers=layers, masks=old)
    return pruner.compute(sparsity, generator=generator)


def prune(
    student: Student,
    config: PruneConfig,
    *,
    data: Splits,
    epochs: int,
    train_config: TrainConfig = TrainConfig(),
    checkpoint: str | Path | None = None,
    seed: int = 0,
    augment: bool = True,
    tracker: Tracker | None = None,
) -> Student:
    """Prune ``student`` to ``config.sparsity`` (global, unstructured) while fine-tuning for
    ``epochs`` on the student's device. Works in any form (FP32 or fake-quant); returns the
    student with masks."""
    model = student.model
    pruner = GlobalPruner(model, importance=importance(config.criterion), exclude=config.exclude, masks=student.masks)

    def before_epoch(epoch: int) -> None:
        target = sparsity_at(
            epoch, epochs=epochs, target=config.sparsity, schedule=config.schedule, prune_fraction=config.prune_fraction
        )
        pruner.update(target, generator=torch.Generator().manual_seed(epoch_seed(seed, "prune-random", epoch)))
        log.info("prune epoch %d: target sparsity %.4f", epoch + 1, target)

    if epochs == 0:
        before_epoch(0)
    else:
        train(
            model,
            as_splits(data),
            epochs=epochs,
            lr=config.lr,
            config=train_config,
            masks=pruner.masks,
            before_epoch=chain(qat_epoch_hook(student, epochs), before_epoch),
            checkpoint=checkpoint,
            seed=seed,
            tag="prune",
            lr_key="prune.lr",
            tracker=tracker,
            amp=not student.quantized,
            augment=augment,
        )
    if student.quantized:
        freeze(model)
    return replace(student, model=model, masks=dict(pruner.masks))


class PruneStage(Stage):
    """Stage 'prune' / 'P', section 'prune'."""

    name, letter, section, config_class = "prune", "P", "prune", PruneConfig

    def validate(self, config: RunConfig, spec: StageSpec) -> None:
        if spec.epochs == 0 and config.prune.schedule == "gradual":
            fail(
                "prune.schedule",
                "'gradual' needs prune epochs ('P:N' with N>0); use schedule 'oneshot' for no fine-tuning",
            )

    def preflight(self, model: nn.Module, config: RunConfig, example: torch.Tensor) -> None:
        """prune.exclude matches layers of the model (raises ConfigError otherwise)."""
        prunable_layers(model, config.prune.exclude)

    def target_sparsity(self, section_config: PruneConfig) -> float:
        return section_config.sparsity

    def prune_criterion(self, section_config: PruneConfig) -> str:
        return section_config.criterion

    def prune_exclude(self, section_config: PruneConfig) -> tuple[str, ...]:
        return section_config.exclude

    def run(
        self, student: Student, section_config: PruneConfig, ctx: StageContext, *, epochs: int, checkpoint: Path | None
    ) -> Student:
        return prune(
            student,
            section_config,
            data=ctx.data,
            epochs=epochs,
            train_config=ctx.train_config,
            checkpoint=checkpoint,
            seed=ctx.seed,
            augment=ctx.augment,
            tracker=ctx.tracker,
        )


register_stage(PruneStage())
