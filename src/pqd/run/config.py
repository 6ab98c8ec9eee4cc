"""The whole run's configuration: :class:`RunConfig` (every section plus the stage list, checked
against the stage registry and the model registry) and :func:`load_config`.

The sections themselves and their validation machinery live in :mod:`pqd.config`, below every
module that imports torch; this module sits above the stages, whose registry it reads.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from pqd.config import (
    DataConfig,
    DistillConfig,
    ImpConfig,
    JointConfig,
    MeasureConfig,
    ModelConfig,
    PruneConfig,
    QuantizeConfig,
    Section,
    StructuredConfig,
    TeacherConfig,
    TrainConfig,
    apply_overrides,
    choice,
    fail,
    in_range,
)
from pqd.errors import ConfigError
from pqd.models import list_models
from pqd.safety.safeyaml import load_yaml
from pqd.stages import protocol


@dataclass(frozen=True)
class StageSpec(Section):
    """One entry of the stage list: a registered stage (:mod:`pqd.stages.protocol`) and its epochs."""

    stage: str = "prune"
    epochs: int = 0

    def __post_init__(self):
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


@dataclass(frozen=True)
class RunConfig(Section):
    """A whole compression run. ``stages`` is the ordered pipeline, e.g. 'P:20,Q:40,D:40'; stages
    may repeat ('P:2,P:2'); an empty list is a dense run (the teacher alone)."""

    seed: int = 0
    stages: tuple[StageSpec, ...] = field(default_factory=lambda: parse_stages("P:20,Q:40,D:40"))
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    structured: StructuredConfig = field(default_factory=StructuredConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    imp: ImpConfig = field(default_factory=lambda: ImpConfig())
    joint: JointConfig = field(default_factory=lambda: JointConfig())

    def __post_init__(self):
        if ":" not in self.model.name:
            choice("model.name", self.model.name, list_models())
        in_range("seed", self.seed, 0, 2**63 - 1)  # torch.manual_seed overflows beyond 64 bits
        if isinstance(self.stages, str) or (self.stages and not isinstance(self.stages[0], StageSpec)):
            object.__setattr__(self, "stages", parse_stages(self.stages))
        names = [s.stage for s in self.stages]
        kinds = [protocol.get_stage(n) for n in names]
        quantizing = [i for i, k in enumerate(kinds) if k.quantizes]
        if len(quantizing) > 1:
            fail("stages", f"{self.stage_string()} quantizes {len(quantizing)} times; a student is quantized once, "
                            "so keep one quantizing stage")
        structural = [i for i, k in enumerate(kinds) if k.structural]
        if quantizing and structural and max(structural) > quantizing[0]:
            works = [s for s, k in zip(self.stages, kinds) if k.structural] + [s for s, k in zip(self.stages, kinds) if not k.structural]
            fail("stages", f"{self.stage_string()} changes layer shapes after quantizing; structural stages must come before "
                            f"any quantizing stage, e.g. {','.join(f'{s.letter}:{s.epochs}' for s in works)}")
        if self.quantize.mode in ("ptq", "dynamic") and "quantize" in names:
            mode = self.quantize.mode
            if names[-1] != "quantize":
                fail("quantize.mode", f"{mode!r} calibrates without training, so quantize must be the last stage; use mode 'qat' to train after quantizing")
            if self.stage_epochs("quantize"):
                fail("stages", f"quantize.mode {mode!r} takes no epochs; write 'Q:0' (or 'Q') or use mode 'qat'")
        if self.quantize.mode == "dynamic" and "joint" in names:
            fail("quantize.mode", "the joint stage trains with fake quantization; use mode 'qat' (or 'ptq') with it")
        for s in self.stages:
            if s.epochs == 0 and s.stage == "distill":
                fail("stages", "distill needs at least one epoch, e.g. 'D:10'")
            if s.epochs == 0 and s.stage in ("imp", "joint"):
                fail("stages", f"{s.stage} trains, so it needs epochs, e.g. '{s.letter}:6'")
            if s.epochs == 0 and s.stage == "prune" and self.prune.schedule == "gradual":
                fail("prune.schedule", "'gradual' needs prune epochs ('P:N' with N>0); use schedule 'oneshot' for no fine-tuning")
        if self.quantize.mode == "qat" and "quantize" in names and self.stage_epochs("quantize") == 0:
            fail("stages", "quantize.mode 'qat' needs epochs ('Q:N' with N>0); use quantize.mode 'ptq' for calibration only")

    @classmethod
    def from_dict(cls, data, *, prefix: str = ""):
        if data is not None and not isinstance(data, Mapping):
            fail("config", f"expected a mapping of sections (seed, stages, model, ...), got {type(data).__name__}")
        data = dict(data or {})
        if "stages" in data:
            data["stages"] = parse_stages(data["stages"])
        return super().from_dict(data, prefix=prefix)

    def to_dict(self):
        d = super().to_dict()
        d["stages"] = self.stage_string()
        return d

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


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> RunConfig:
    """Read a YAML config file (or the defaults when ``path`` is None), apply overrides, validate.

    The file is read with :func:`pqd.safety.safeyaml.load_yaml` (size, depth, node and alias limits:
    YAML bombs are refused); nothing named in it is imported here."""
    data: dict = {}
    if path is not None:
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
    return RunConfig.from_dict(apply_overrides(data, overrides))
