"""The stage protocol: what every compression stage is, and the registry that finds stages by name.

A stage turns a :class:`~pqd.compress.student.Student` into a new one. Each stage is one module
of :mod:`pqd.stages` holding its config section (a :class:`pqd.config.Section` dataclass), its
validation, its function and its registration (``register_stage(MyStage())`` at the end of the
module). The pipeline (:mod:`pqd.run.pipeline`), the run config (:mod:`pqd.run.config`) and the
training loop know no stage by name: they read what a stage declares here.

Adding a stage with its own options::

    # src/pqd/stages/mystage.py
    @dataclass(frozen=True)
    class MyConfig(Section):
        strength: float = 0.5

    class MyStage(Stage):
        name, letter, section, config_class = "mystage", "M", "mystage", MyConfig

        def run(self, student, section_config, ctx, *, epochs, checkpoint): ...

    register_stage(MyStage())

and its import in ``src/pqd/stages/__init__.py`` (or ``register_stage`` from user code).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import torch
from torch import nn

from pqd.compress.student import Student
from pqd.config import TrainConfig
from pqd.data import Splits
from pqd.errors import ConfigError

# The run config (pqd.run.config.RunConfig / StageSpec) sits above this layer and imports it, so it is
# annotated as Any here (an explicit alias: a plain assignment is a variable, not a type, to mypy).
RunConfig: TypeAlias = Any
StageSpec: TypeAlias = Any


@dataclass(frozen=True)
class StageContext:
    """Everything a stage may need, and nothing about files. ``index``: the stage's position in the run's list."""

    data: Splits
    teacher: nn.Module | None
    config: RunConfig
    train_config: TrainConfig
    seed: int
    augment: bool
    device: torch.device
    tracker: Any = None  # a pqd.train.tracking.Tracker, or None
    index: int = 0


class Stage:
    """What a stage declares. Subclasses set the attributes and implement :meth:`run`; the other
    methods are optional hooks with do-nothing defaults."""

    name: str  # "prune", "quantize", "distill", ...
    letter: str  # "P", "Q", "D", ... (used in "P:20,Q:40,D:40")
    section: str | None = None  # the run config's key holding its options, e.g. "prune"
    config_class: type | None = None  # the Section dataclass of that key
    quantizes: bool = False  # the stage turns the student quantized (at most one per run)
    structural: bool = False  # the stage changes layer shapes (must come before any quantizing stage)
    aliases: tuple[str, ...] = ()  # other names accepted in stage lists

    def run(
        self, student: Student, section_config: Any, ctx: StageContext, *, epochs: int, checkpoint: Path | None
    ) -> Student:
        raise NotImplementedError

    def validate(self, config: RunConfig, spec: StageSpec) -> None:
        """Raise ConfigError where ``config`` cannot run this entry of its stage list (called once per entry)."""

    def preflight(self, model: nn.Module, config: RunConfig, example: torch.Tensor) -> None:
        """Raise before any training where the model cannot take this stage (called once per stage)."""

    def target_sparsity(self, section_config: Any) -> float | None:
        """The fraction of prunable weights this stage prunes to, or None if it does not prune."""
        return None

    def prune_criterion(self, section_config: Any) -> str | None:
        """How this stage picks the weights it prunes ('magnitude', 'random'), or None if it does not prune."""
        return None

    def prune_exclude(self, section_config: Any) -> tuple[str, ...] | None:
        """The layers this stage leaves dense (module-name globs), or None if it does not prune."""
        return None


# --------------------------------------------------------------------------- registry

_STAGES: dict[str, Stage] = {}


def _keys(stage: Stage) -> list[str]:
    return [stage.name.lower(), stage.letter.lower(), *(a.lower() for a in stage.aliases)]


def register_stage(stage: Stage, *, replace: bool = False) -> Stage:
    """Make ``stage`` available to stage lists by its name, letter and aliases."""
    if not isinstance(stage, Stage):
        raise TypeError(f"{stage!r} is not a Stage: subclass pqd.stages.Stage")
    if (stage.section is None) != (stage.config_class is None):
        raise ValueError(f"stage {stage.name!r}: a section needs its config_class and a config_class its section")
    for other in list_stages():
        if (
            stage.section is not None
            and other.name != stage.name
            and other.section == stage.section
            and other.config_class is not stage.config_class
        ):
            raise ValueError(
                f"stage {stage.name!r}: section {stage.section!r} is stage {other.name!r}'s, with other options"
            )
    if not stage.name.isidentifier() or len(stage.letter) != 1 or not stage.letter.isalpha():
        raise ValueError(
            f"stage {stage.name!r}: the name must be an identifier and the letter one letter, got {stage.letter!r}"
        )
    for key in _keys(stage):
        existing = _STAGES.get(key)
        if existing is not None and existing.name != stage.name:
            raise ValueError(f"stage {stage.name!r}: {key!r} already names stage {existing.name!r}")
        if existing is not None and not replace:
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


def sections() -> dict[str, type]:
    """Config key -> Section class of every registered stage that has options, in registration order."""
    out: dict[str, type] = {}
    for s in list_stages():
        if s.section is not None and s.config_class is not None:  # register_stage: both or neither
            out.setdefault(s.section, s.config_class)
    return out
