"""The whole run's configuration: :class:`RunConfig` (every section plus the stage list, checked
against the stage registry and the model registry) and :func:`load_config`.

The sections themselves and their validation machinery live in :mod:`pqd.config`, below every
module that imports torch; this module sits above the stages, whose registry it reads.
"""

from __future__ import annotations

import difflib
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pqd.config import (
    DataConfig,
    MeasureConfig,
    ModelConfig,
    Section,
    TeacherConfig,
    TrainConfig,
    apply_overrides,
    choice,
    coerce,
    fail,
    in_range,
)
from pqd.errors import ConfigError
from pqd.models import list_models
from pqd.safety.safeyaml import load_yaml
from pqd.stages import protocol

_S = TypeVar("_S", bound=Section)
_R = TypeVar("_R", bound="RunConfig")


@dataclass(frozen=True)
class StageSpec(Section):
    """One entry of the stage list: a registered stage (:mod:`pqd.stages.protocol`) and its epochs."""

    stage: str = ""
    epochs: int = 0

    def __post_init__(self) -> None:
        try:
            canonical = protocol.get_stage(self.stage).name
        except ConfigError:
            choice("stages[].stage", self.stage, [s.name for s in protocol.list_stages()])
        object.__setattr__(self, "stage", canonical)
        in_range(f"stages.{self.stage}.epochs", self.epochs, 0)

    @property
    def letter(self) -> str:
        return protocol.get_stage(self.stage).letter


def _stage_help() -> str:
    return "/".join(f"{s.letter}/{s.name}" for s in protocol.list_stages())


def parse_stages(spec: str | typing.Sequence[Any] | None) -> tuple[StageSpec, ...]:
    """``"P:20,Q:40,D:40"`` or a list of ``{stage, epochs}`` mappings → StageSpecs.

    Names, letters and aliases come from the stage registry; stages may repeat ("P:2,P:2");
    an empty string or list (or "dense"/"none") is a dense run: the teacher alone.
    """
    if spec is None:
        return ()
    if isinstance(spec, str):
        if spec.strip().lower() in ("dense", "none"):
            return ()
        items = [s.strip() for s in spec.split(",") if s.strip()]
        out = []
        for item in items:
            name, _, epochs = item.partition(":")
            try:
                full = protocol.get_stage(name.strip()).name
            except ConfigError:
                fail("stages", f"unknown stage {name!r} in {spec!r}; use {_stage_help()}, e.g. 'P:20,Q:40,D:40'")
            try:
                n = int(epochs) if epochs.strip() else 0
            except ValueError:
                fail("stages", f"epochs for {name!r} must be an integer, got {epochs!r} in {spec!r}")
            out.append(StageSpec(full, n))
        return tuple(out)
    if not isinstance(spec, (list, tuple)):
        fail("stages", f"expected a string like 'P:20,Q:40,D:40' or a list, got {spec!r}")
    return tuple(s if isinstance(s, StageSpec) else StageSpec.from_dict(s, prefix="stages[].") for s in spec)


_BASE = ("seed", "stages", "model", "data", "train", "teacher", "measure")


@dataclass(frozen=True, init=False)
class RunConfig(Section):
    """A whole compression run. ``stages`` is the ordered pipeline, e.g. 'P:20,Q:40,D:40'; stages
    may repeat ('P:2,P:2'); an empty list is a dense run (the teacher alone).

    Besides the fixed sections below, the run holds one section per registered stage that has
    options (``prune``, ``quantize``, ...; :func:`pqd.stages.protocol.sections`), read as
    attributes (``config.prune``) and given as keywords (``RunConfig(prune=PruneConfig(...))``)."""

    seed: int
    stages: tuple[StageSpec, ...]
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    teacher: TeacherConfig
    measure: MeasureConfig
    sections: tuple[tuple[str, Section], ...]  # (key, section) of every registered stage section, in registration order

    def __init__(
        self,
        seed: int = 0,
        stages: Any = "P:20,Q:40,D:40",
        model: ModelConfig | None = None,
        data: DataConfig | None = None,
        train: TrainConfig | None = None,
        teacher: TeacherConfig | None = None,
        measure: MeasureConfig | None = None,
        sections: Any = (),
        **stage_sections: Section,
    ):
        given = dict(sections) | stage_sections
        known = protocol.sections()
        for key in given:
            if key not in known:
                fail(key, f"unknown section; valid keys: {', '.join((*_BASE, *known))}")
        values = {
            "seed": seed,
            "stages": stages,
            "model": model or ModelConfig(),
            "data": data or DataConfig(),
            "train": train or TrainConfig(),
            "teacher": teacher or TeacherConfig(),
            "measure": measure or MeasureConfig(),
            "sections": tuple((key, given.get(key) or cls()) for key, cls in known.items()),
        }
        for key, value in values.items():
            object.__setattr__(self, key, value)
        self.__post_init__()

    def __getattr__(self, name: str) -> Section:
        if name != "sections":
            sections: tuple[tuple[str, Section], ...] = self.__dict__.get("sections", ())
            for key, section in sections:
                if key == name:
                    return section
        raise AttributeError(f"{type(self).__name__!r} has no section {name!r}")

    @classmethod
    def schema(cls) -> dict[str, type | None]:
        """Top-level key -> its Section class (None for plain values: seed, stages), in file order."""
        hints = typing.get_type_hints(cls)
        out: dict[str, type | None] = {}
        for key in _BASE:
            h = hints[key]
            out[key] = h if isinstance(h, type) and issubclass(h, Section) else None
        return out | protocol.sections()

    def __post_init__(self) -> None:
        if ":" not in self.model.name and self.model.name not in (names := list_models()):
            name = self.model.name
            dotted = "." in name and all(p.isidentifier() for p in name.split("."))
            hint = (
                f"; for your own model give its factory too: '{name}:factory'"
                if dotted
                else "; or your own model as an import path 'package.module:factory'"
            )
            fail("model.name", f"{name!r} is not valid; choose one of {', '.join(map(repr, names))}{hint}")
        in_range("seed", self.seed, 0, 2**63 - 1)  # torch.manual_seed overflows beyond 64 bits
        if isinstance(self.stages, str) or (self.stages and not isinstance(self.stages[0], StageSpec)):
            object.__setattr__(self, "stages", parse_stages(self.stages))
        kinds = [protocol.get_stage(s.stage) for s in self.stages]
        quantizing = [i for i, k in enumerate(kinds) if k.quantizes]
        if len(quantizing) > 1:
            fail(
                "stages",
                f"{self.stage_string()} quantizes {len(quantizing)} times; a student is quantized once, "
                "so keep one quantizing stage",
            )
        structural = [i for i, k in enumerate(kinds) if k.structural]
        if quantizing and structural and max(structural) > quantizing[0]:
            works = [s for s, k in zip(self.stages, kinds, strict=True) if k.structural] + [
                s for s, k in zip(self.stages, kinds, strict=True) if not k.structural
            ]
            fail(
                "stages",
                f"{self.stage_string()} changes layer shapes after quantizing; structural stages must come before "
                f"any quantizing stage, e.g. {','.join(f'{s.letter}:{s.epochs}' for s in works)}",
            )
        for spec, stage in zip(self.stages, kinds, strict=True):
            stage.validate(self, spec)

    def section(self, key: str | None) -> Section | None:
        """The section ``key`` (a stage's ``section``), or None for None."""
        return None if key is None else getattr(self, key)

    def section_as(self, key: str, cls: type[_S]) -> _S:
        """The stage section ``key`` typed as ``cls`` (its stage's ``config_class``), e.g.
        ``config.section_as("quantize", QuantizeConfig)``: ``config.quantize`` for the type checker."""
        section = getattr(self, key)
        if not isinstance(section, cls):
            raise TypeError(
                f"section {key!r} is a {type(section).__name__}, not a {cls.__name__}"
            )  # a registry bug, not user input
        return section

    @classmethod
    def from_dict(cls: type[_R], data: Mapping[str, Any] | None, *, prefix: str = "") -> _R:
        if data is not None and not isinstance(data, Mapping):
            fail("config", f"expected a mapping of sections (seed, stages, model, ...), got {type(data).__name__}")
        data = dict(data or {})
        schema = cls.schema()
        hints = typing.get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key not in schema:
                close = difflib.get_close_matches(str(key), list(schema), n=1)
                hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
                fail(f"{prefix}{key}", f"unknown key.{hint} Valid keys: {', '.join(schema)}")
            if key == "stages":
                kwargs[key] = parse_stages(value)
            elif schema[key] is None:
                kwargs[key] = coerce(f"{prefix}{key}", value, hints[key])
            else:
                kwargs[key] = coerce(f"{prefix}{key}", value, schema[key])
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"seed": self.seed, "stages": self.stage_string()}
        d |= {key: getattr(self, key).to_dict() for key in _BASE[2:]}
        return d | {key: section.to_dict() for key, section in self.sections}

    def stage_string(self) -> str:
        """'P:20,Q:40,D:40' (letters from the stage registry); '' for a dense run."""
        return ",".join(f"{s.letter}:{s.epochs}" for s in self.stages)

    def stage_epochs(self, name: str) -> int:
        """Epochs of the first ``name`` stage (0 if the run has none)."""
        return next((s.epochs for s in self.stages if s.stage == name), 0)

    @property
    def quantizes(self) -> bool:
        """True if a stage of the run turns the student quantized (the final model is INT8)."""
        return any(protocol.get_stage(s.stage).quantizes for s in self.stages)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping a YAML config file holds (empty for an empty file), read with
    :func:`pqd.safety.safeyaml.load_yaml` (size, depth, node and alias limits: YAML bombs are refused);
    nothing named in it is imported here. Raises ConfigError for a missing, unreadable or non-mapping file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} {'is a directory' if p.is_dir() else 'does not exist'}")
    try:
        data = load_yaml(p, where=f"config file {str(p)!r}")
    except OSError as exc:
        raise ConfigError(f"config file {str(p)!r} cannot be read as text: {exc}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
    return data


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> RunConfig:
    """Read a YAML config file (:func:`read_config_file`; the defaults when ``path`` is None), apply
    overrides, validate."""
    data = read_config_file(path) if path is not None else {}
    return RunConfig.from_dict(apply_overrides(data, overrides))
