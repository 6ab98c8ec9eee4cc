"""Stage registry: one small protocol, so a new compression stage is one file plus one line.

A stage turns a :class:`~pqd.stages.common.Student` into a new one. The pipeline
(:mod:`pqd.pipeline`) knows nothing about particular stages: it looks each entry of the run's
stage list up here (by name, letter or alias) and calls ``stage.run(student, ctx, ...)``. The
config (:mod:`pqd.config`) validates stage lists against this registry too, using the flags
each stage declares (``quantizes``, ``structural``).

Adding a stage::

    # src/pqd/stages/mystage.py
    @dataclass(frozen=True)
    class MyStage:
        name: str = "mystage"; letter: str = "M"; section: str | None = None
        quantizes: bool = False; structural: bool = False; aliases: tuple[str, ...] = ()
        def run(self, student, ctx, *, epochs, checkpoint, index): ...

    # and one entry in _builtin() below (or register_stage(MyStage()) from user code)
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import nn

from pqd.errors import ConfigError
from pqd.stages.common import Student

if TYPE_CHECKING:  # pqd.config imports this module (to validate stage lists): for annotations only
    from pqd.config import RunConfig, TrainConfig
    from pqd.data.base import Splits


@dataclass(frozen=True)
class StageContext:
    """Everything a stage may need, and nothing about files."""

    data: Splits
    teacher: nn.Module | None
    config: RunConfig
    train_config: TrainConfig
    seed: int
    augment: bool
    device: torch.device
    tracker: Any = None  # a pqd.integrations.tracking.Tracker, or None


@runtime_checkable
class Stage(Protocol):
    name: str  # "prune", "quantize", "distill", ...
    letter: str  # "P", "Q", "D", ... (used in "P:20,Q:40,D:40")
    section: str | None  # RunConfig section holding its options, e.g. "prune"
    quantizes: bool  # the stage turns the student quantized (at most one per run)
    structural: bool  # the stage changes layer shapes (must come before any quantizing stage)

    def run(self, student: Student, ctx: StageContext, *, epochs: int, checkpoint: Path | None, index: int) -> Student: ...


# --------------------------------------------------------------------------- built-in adapters
# Thin adapters around the function stages; they look the function up at call time, so the
# functions stay the single implementation (and the Python API) of each stage.


@dataclass(frozen=True)
class PruneStage:
    name: str = "prune"
    letter: str = "P"
    section: str | None = "prune"
    quantizes: bool = False
    structural: bool = False
    aliases: tuple[str, ...] = ()

    def preflight(self, model: nn.Module, config: RunConfig, example: torch.Tensor) -> None:
        """prune.exclude matches layers of the model (raises ConfigError otherwise)."""
        import_module("pqd.stages.prune").prunable_layers(model, config.prune.exclude)

    def run(self, student: Student, ctx: StageContext, *, epochs: int, checkpoint: Path | None, index: int) -> Student:
        module = import_module("pqd.stages.prune")  # the module; pqd.stages.prune is the function

        out: Student = module.prune(student, ctx.config.prune, data=ctx.data, epochs=epochs, train_config=ctx.train_config,
                            checkpoint=checkpoint, seed=ctx.seed, augment=ctx.augment, tracker=ctx.tracker)
        return out


@dataclass(frozen=True)
class QuantizeStage:
    name: str = "quantize"
    letter: str = "Q"
    section: str | None = "quantize"
    quantizes: bool = True
    structural: bool = False
    aliases: tuple[str, ...] = ()

    def preflight(self, model: nn.Module, config: RunConfig, example: torch.Tensor) -> None:
        """torch.fx can trace the model (raises ModelError naming the untraceable submodule)."""
        import_module("pqd.stages.quantize").prepare(model, example, mode=config.quantize.mode,
                                                     reduce_range=config.quantize.reduce_range,
                                                     options=import_module("pqd.qoptions").quant_options(config.quantize),
                                                     leaf_modules=config.quantize.leaf_modules)

    def run(self, student: Student, ctx: StageContext, *, epochs: int, checkpoint: Path | None, index: int) -> Student:
        module = import_module("pqd.stages.quantize")  # the module; pqd.stages.quantize is the function

        out: Student = module.quantize(student, ctx.config.quantize, data=ctx.data, epochs=epochs, train_config=ctx.train_config,
                               checkpoint=checkpoint, seed=ctx.seed, augment=ctx.augment, tracker=ctx.tracker)
        return out


@dataclass(frozen=True)
class DistillStage:
    name: str = "distill"
    letter: str = "D"
    section: str | None = "distill"
    quantizes: bool = False
    structural: bool = False
    aliases: tuple[str, ...] = ("kd",)

    def run(self, student: Student, ctx: StageContext, *, epochs: int, checkpoint: Path | None, index: int) -> Student:
        module = import_module("pqd.stages.distill")  # the module; pqd.stages.distill is the function

        if getattr(ctx.config.distill, "kind", "response") != "response":  # feature/attention/mutual/self
            out: Student = import_module("pqd.stages.distill_variants").distill_variant(
                student, ctx.config.distill, teacher=ctx.teacher, data=ctx.data, epochs=epochs, train_config=ctx.train_config,
                checkpoint=checkpoint, seed=ctx.seed, augment=ctx.augment)
            return out
        if ctx.teacher is None:
            raise ConfigError("stages: distill needs the dense teacher, and this context has none")
        out = module.distill(student, ctx.config.distill, teacher=ctx.teacher, data=ctx.data, epochs=epochs,
                              train_config=ctx.train_config, checkpoint=checkpoint, seed=ctx.seed, augment=ctx.augment, tracker=ctx.tracker)
        return out


def _builtin() -> list[Stage]:
    # one line per built-in stage (a new stage adds its line here)
    return [PruneStage(), QuantizeStage(), DistillStage(), import_module("pqd.stages.structured").StructuredStage(),
            import_module("pqd.stages.imp").ImpStage(), import_module("pqd.stages.joint").JointStage()]


# --------------------------------------------------------------------------- registry

_STAGES: dict[str, Stage] = {}


def _keys(stage: Stage) -> list[str]:
    return [stage.name.lower(), stage.letter.lower(), *(a.lower() for a in getattr(stage, "aliases", ()))]


def register_stage(stage: Stage, *, replace: bool = False) -> Stage:
    """Make ``stage`` available to stage lists by its name, letter and aliases."""
    for attr in ("name", "letter", "section", "quantizes", "structural", "run"):
        if not hasattr(stage, attr):
            raise TypeError(f"{stage!r} is not a Stage: it has no {attr!r}")
    if not stage.name.isidentifier() or len(stage.letter) != 1 or not stage.letter.isalpha():
        raise ValueError(f"stage {stage.name!r}: the name must be an identifier and the letter one letter, got {stage.letter!r}")
    for key in _keys(stage):
        other = _STAGES.get(key)
        if other is not None and other.name != stage.name:
            raise ValueError(f"stage {stage.name!r}: {key!r} already names stage {other.name!r}")
        if other is not None and not replace:
            raise ValueError(f"stage {stage.name!r} is already registered; pass replace=True to replace it")
    unregister_stage(stage.name)
    for key in _keys(stage):
        _STAGES[key] = stage
    return stage


def unregister_stage(name: str) -> None:
    """Remove a stage (all its keys); a no-op for an unknown name."""
    stage = _STAGES.get(name.lower())
    if stage is not None:
        for key in [k for k, v in _STAGES.items() if v is stage]:
            del _STAGES[key]


def get_stage(name_or_letter: str) -> Stage:
    """The stage named ``name_or_letter`` (its name, letter or an alias; case-insensitive)."""
    stage = _STAGES.get(str(name_or_letter).strip().lower())
    if stage is None:
        choices = ", ".join(f"{s.letter}/{s.name}" for s in list_stages())
        raise ConfigError(f"stages: unknown stage {name_or_letter!r}; registered stages are {choices}")
    return stage


def list_stages() -> list[Stage]:
    """Registered stages, each once, in registration order."""
    seen: dict[str, Stage] = {}
    for s in _STAGES.values():
        seen.setdefault(s.name, s)
    return list(seen.values())


for _s in _builtin():
    register_stage(_s)
