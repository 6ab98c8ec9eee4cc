"""Iterative magnitude pruning with rewinding: lottery tickets (Frankle & Carbin 2019; late
rewinding: Frankle et al. 2020), as a stage (name 'imp', letter 'L').

With ``imp.rounds = R`` the stage's ``epochs`` split into ``R + 1`` training segments of
``epochs // (R + 1)`` epochs (the remainder goes to the last segment). Segment 0 trains the
student as it came; after every segment but the last, the stage

1. prunes ``imp.fraction`` of the *remaining* prunable weights by global magnitude (one
   threshold over all layers; weights pruned before stay pruned), then
2. rewinds the surviving weights (and every other parameter and buffer) to the rewind point
   and applies the mask, and trains the next segment from there with a fresh optimizer and
   LR schedule.

Rewind points (``imp.rewind``): ``'init'`` - a fresh random initialisation of the same
architecture, seeded by the run's seed (the original lottery ticket); ``'start'`` (or ``0``)
- the weights the stage received (in pqd usually the trained dense teacher); ``k >= 1`` -
the weights after epoch ``k`` of segment 0 (late rewinding; ``k`` must not exceed that
segment's length).

The final mask ("winning ticket") is the student's ``masks``: later stages (QAT, KD, ...)
keep it, exactly as after the prune stage. Final sparsity: ``1 - (1 - s0)(1 - fraction)^R``
where ``s0`` is the sparsity the student arrived with. At equal total epochs IMP spends its
epochs re-training from the rewind point, where AGP spends them on one gradual ramp.

Works in FP32 or fake-quant form. Resumable: each segment has its own per-epoch checkpoint
next to the stage's, and the rewind weights are saved once taken.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from pqd.compress.qat import freeze
from pqd.compress.sparsity import DEFAULT_EXCLUDE, GlobalPruner, MagnitudeImportance, global_sparsity, prunable_layers
from pqd.compress.student import Student, chain, qat_epoch_hook
from pqd.config import Section, TrainConfig, choice, fail, in_range
from pqd.data import Splits
from pqd.data.adapters import as_splits
from pqd.errors import ConfigError
from pqd.models.reinit import reinitialize
from pqd.stages.protocol import RunConfig, Stage, StageContext, StageSpec, register_stage
from pqd.train.checkpoint import load_checkpoint, save_checkpoint
from pqd.train.loop import epoch_seed, train
from pqd.train.tracking import Tracker

__all__ = ["ImpStage", "imp", "segments"]

log = logging.getLogger("pqd.imp")


@dataclass(frozen=True)
class ImpConfig(Section):
    """Iterative magnitude pruning with rewinding (lottery tickets; stage 'imp' / 'L').

    The stage's epochs split into ``rounds + 1`` equal training segments (the remainder goes to
    the last): train → prune ``fraction`` of the remaining weights (global magnitude) → rewind
    the survivors → train ..., ending with training on the final mask. Final sparsity is
    ``1 - (1 - fraction) ** rounds`` of the prunable weights (plus what earlier stages pruned).
    ``rewind``: 'init' (a fresh random initialisation, seeded: the original lottery ticket),
    'start' (the weights the stage received, e.g. the dense teacher's) or an epoch k >= 1 of
    the first segment (late rewinding). ``exclude``: layers left dense (as prune.exclude)."""

    rounds: int = 3
    fraction: float = 0.5
    rewind: int | str = 1
    lr: float = 0.01
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE

    def __post_init__(self) -> None:
        in_range("imp.rounds", self.rounds, 1, 100)
        in_range("imp.fraction", self.fraction, 0.0, 1.0, hi_open=True)
        if self.fraction <= 0.0:
            fail("imp.fraction", f"{self.fraction!r} must be > 0 (the fraction of remaining weights pruned each round)")
        if isinstance(self.rewind, str):
            choice("imp.rewind", self.rewind, ("init", "start"))
        else:
            in_range("imp.rewind", self.rewind, 0)
        in_range("imp.lr", self.lr, 0.0)

    @property
    def sparsity(self) -> float:
        """The fraction of the prunable weights the stage prunes in all."""
        return 1.0 - (1.0 - self.fraction) ** self.rounds


def segments(epochs: int, rounds: int) -> list[int]:
    """Epochs of each of the ``rounds + 1`` training segments (the remainder goes to the last)."""
    if epochs < rounds + 1:
        raise ConfigError(
            f"imp: {rounds} rounds need at least {rounds + 1} epochs (one per training segment), got {epochs}"
        )
    base = epochs // (rounds + 1)
    return [base] * rounds + [epochs - base * rounds]


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def imp(
    student: Student,
    config: ImpConfig,
    *,
    data: Splits,
    epochs: int,
    train_config: TrainConfig = TrainConfig(),
    checkpoint: str | Path | None = None,
    seed: int = 0,
    augment: bool = True,
    tracker: Tracker | None = None,
) -> Student:
    """Run ``config.rounds`` rounds of train → prune ``config.fraction`` of the remaining weights
    → rewind, then train on the final mask; ``epochs`` in all. Returns the student with the
    winning-ticket masks (``student.records['imp']`` has the per-round sparsities)."""
    data = as_splits(data)
    model = student.model
    segs = segments(epochs, config.rounds)
    rewind = config.rewind
    if isinstance(rewind, int) and rewind > segs[0]:
        raise ConfigError(
            f"imp.rewind: epoch {rewind} is past the first training segment ({segs[0]} epochs of {epochs}); "
            f"use an epoch <= {segs[0]}, 'start' or 'init'"
        )
    pruner = GlobalPruner(model, importance=MagnitudeImportance(), exclude=config.exclude, masks=student.masks)
    s0 = global_sparsity(model, pruner.layers) if pruner.masks else 0.0
    ckpt = Path(checkpoint) if checkpoint else None
    rewind_file = ckpt.with_name(ckpt.stem + ".rewind.safetensors") if ckpt else None

    # the rewind point: taken now ('init' / 'start' / 0) or during segment 0 (epoch k)
    rewind_state: dict[str, torch.Tensor] | None = None
    if rewind_file is not None and rewind_file.exists():
        rewind_state = load_checkpoint(rewind_file)[0]
    elif rewind == "init":
        rewind_state = _state(reinitialize(model, seed=epoch_seed(seed, "imp-init", 0)))
    elif rewind in ("start", 0):
        rewind_state = _state(model)
    if rewind_state is not None and rewind_file is not None and not rewind_file.exists():
        save_checkpoint(rewind_file, rewind_state, {"rewind": str(rewind)})

    def take_rewind(epoch: int) -> None:
        nonlocal rewind_state
        if rewind_state is None and epoch == rewind:
            rewind_state = _state(model)
            if rewind_file is not None:
                save_checkpoint(rewind_file, rewind_state, {"rewind": str(rewind)})
            log.info("imp: rewind point taken after epoch %d", epoch)

    history = []
    for r, n in enumerate(segs):
        seg_ckpt = ckpt.with_name(f"{ckpt.stem}.segment{r}.safetensors") if ckpt else None
        hooks = chain(qat_epoch_hook(student, n), take_rewind if r == 0 else None)
        train(
            model,
            data,
            epochs=n,
            lr=config.lr,
            config=train_config,
            masks=pruner.masks,
            before_epoch=hooks,
            checkpoint=seg_ckpt,
            seed=seed,
            tag=f"imp{r}",
            lr_key="imp.lr",
            tracker=tracker,
            amp=not student.quantized,
            augment=augment,
        )
        if r == 0:
            take_rewind(n)  # rewind == segment length: the weights at the end of segment 0
        if r == len(segs) - 1:
            break
        target = 1.0 - (1.0 - s0) * (1.0 - config.fraction) ** (r + 1)
        pruner.update(target)
        assert rewind_state is not None  # taken by take_rewind(n) after segment 0 at the latest
        with torch.no_grad():
            model.load_state_dict(rewind_state)
        pruner.masks.apply()
        history.append({"round": r + 1, "sparsity": round(global_sparsity(model, pruner.layers), 6)})
        log.info("imp round %d/%d: pruned to %.4f, rewound to %s", r + 1, config.rounds, target, rewind)
    if student.quantized:
        freeze(model)
    if ckpt is not None and rewind_file is not None:  # the pipeline removes the stage's own epoch file; these are ours
        for f in [rewind_file, *(ckpt.with_name(f"{ckpt.stem}.segment{r}.safetensors") for r in range(len(segs)))]:
            f.unlink(missing_ok=True)
    records = dict(student.records) | {
        "imp": {
            "rounds": config.rounds,
            "fraction": config.fraction,
            "rewind": str(rewind),
            "segments": segs,
            "history": history,
        }
    }
    return replace(student, model=model, masks=dict(pruner.masks), records=records)


class ImpStage(Stage):
    """Stage 'imp' / 'L' (lottery), section 'imp'."""

    name, letter, section, config_class = "imp", "L", "imp", ImpConfig
    aliases = ("lottery", "lth")

    def validate(self, config: RunConfig, spec: StageSpec) -> None:
        if spec.epochs == 0:
            fail("stages", f"{self.name} trains, so it needs epochs, e.g. '{self.letter}:6'")

    def preflight(self, model: nn.Module, config: RunConfig, example: torch.Tensor) -> None:
        prunable_layers(model, config.imp.exclude)
        for s in config.stages:
            if s.stage == self.name:
                segs = segments(s.epochs, config.imp.rounds)
                if isinstance(config.imp.rewind, int) and config.imp.rewind > segs[0]:
                    raise ConfigError(
                        f"imp.rewind: epoch {config.imp.rewind} is past the first training segment "
                        f"({segs[0]} of {s.epochs} epochs)"
                    )

    def target_sparsity(self, section_config: ImpConfig) -> float:
        return section_config.sparsity

    def prune_criterion(self, section_config: ImpConfig) -> str:
        return "magnitude"

    def prune_exclude(self, section_config: ImpConfig) -> tuple[str, ...]:
        return section_config.exclude

    def run(
        self, student: Student, section_config: ImpConfig, ctx: StageContext, *, epochs: int, checkpoint: Path | None
    ) -> Student:
        return imp(
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


register_stage(ImpStage())
