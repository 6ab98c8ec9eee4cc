"""Run configuration: frozen dataclasses that validate themselves and serialize.

Every section is a frozen dataclass whose ``__post_init__`` checks its values and
raises :class:`pqd.errors.ConfigError` naming the key and the valid choices. A whole
run is a :class:`RunConfig`; ``RunConfig.from_dict`` rejects unknown keys (suggesting
the closest valid name) and ``to_dict`` gives back plain data for YAML/JSON.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from pqd.errors import ConfigError

if TYPE_CHECKING:  # pqd.stages.registry imports this module: for annotations only
    from pqd.stages.registry import Stage

_S = TypeVar("_S", bound="Section")

DATASETS = ("digits", "cifar10", "cifar100", "folder")


def _fail(key: str, msg: str) -> typing.NoReturn:
    raise ConfigError(f"{key}: {msg}")


def _choice(key: str, value: Any, choices: typing.Sequence[str]) -> None:
    if value not in choices:
        _fail(key, f"{value!r} is not valid; choose one of {', '.join(map(repr, choices))}")


def _range(key: str, value: float, lo: float | None = None, hi: float | None = None, *, hi_open: bool = False) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        _fail(key, f"{value!r} is not a finite number")
    if lo is not None and value < lo:
        _fail(key, f"{value!r} is below the minimum {lo}")
    if hi is not None and (value >= hi if hi_open else value > hi):
        _fail(key, f"{value!r} must be {'<' if hi_open else '<='} {hi}")


class Section:
    """Mixin: dict round-trip with validation of keys and types."""

    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]  # every Section is a dataclass

    @classmethod
    def from_dict(cls: type[_S], data: Mapping[str, Any] | None, *, prefix: str = "") -> _S:
        data = {} if data is None else data
        if not isinstance(data, Mapping):
            _fail(prefix.rstrip(".") or "config", f"expected a mapping, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in data.items():
            if key not in fields:
                close = difflib.get_close_matches(str(key), list(fields), n=1)
                hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
                _fail(f"{prefix}{key}", f"unknown key.{hint} Valid keys: {', '.join(fields)}")
            kwargs[key] = _coerce(f"{prefix}{key}", value, hints[key])
        try:
            return cls(**kwargs)
        except ConfigError as exc:
            if prefix and not str(exc).startswith(prefix.split("[")[0].rstrip(".")):  # 'stages[].' vs 'stages.prune.epochs'
                raise ConfigError(f"{prefix}{exc}") from None
            raise

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Section):
                v = v.to_dict()
            elif isinstance(v, tuple):
                v = [x.to_dict() if isinstance(x, Section) else x for x in v]
            out[f.name] = v
        return out


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against a type hint, converting only where it is lossless."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as exc:
                errors.append(str(exc))
        _fail(key, f"{value!r} has the wrong type ({' / '.join(e.split(': ', 1)[-1] for e in errors)})")
    if isinstance(hint, type) and issubclass(hint, Section):
        return value if isinstance(value, hint) else hint.from_dict(value, prefix=f"{key}.")
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            _fail(key, f"expected a list, got {type(value).__name__} {value!r}")
        (arg, *_) = typing.get_args(hint)
        return tuple(_coerce(f"{key}[{i}]", v, arg) for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            _fail(key, f"expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(key, f"expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(key, f"expected a number, got {value!r}")
        try:
            return float(value)
        except OverflowError:
            _fail(key, f"{value!r} is too large")
    if hint is str:
        if not isinstance(value, str):
            _fail(key, f"expected a string, got {value!r}")
        return value
    if hint is Any:
        return value
    raise TypeError(f"unsupported config type {hint!r} for {key}")  # a pqd bug, not user input


@dataclass(frozen=True)
class ModelConfig(Section):
    """Backbone: a registry name (``pqd.list_models()``), ``torchvision:<name>`` / ``timm:<name>``
    (:mod:`pqd.external_models`), or ``package.module:factory``."""

    name: str = "resnet18"
    width: float = 1.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if ":" not in self.name:
            from pqd.registry import list_models

            names = list_models()
            if self.name not in names:
                dotted = "." in self.name and all(p.isidentifier() for p in self.name.split("."))
                hint = (f"; for your own model give its factory too: '{self.name}:factory'" if dotted
                        else "; or your own model as an import path 'package.module:factory'")
                _fail("model.name", f"{self.name!r} is not valid; choose one of {', '.join(map(repr, names))}{hint}")
        else:
            from pqd.external_models import is_external  # imports torch: `import pqd` must not (an ONNX timing worker)

            module, _, attr = self.name.partition(":")
            if not is_external(self.name) and not (all(p.isidentifier() for p in module.split(".")) and attr.isidentifier()):
                _fail("model.name", f"{self.name!r} is not an import path 'package.module:factory'")
        _range("model.width", self.width, 0.0625, 4.0)
        _range("model.dropout", self.dropout, 0.0, 1.0, hi_open=True)


@dataclass(frozen=True)
class DataConfig(Section):
    """Dataset. ``root`` is a directory or archive; for CIFAR it may hold the standard
    python archive, its extracted folder, or an image-folder copy (dir or ``.tar.gz``).
    ``val_fraction``: share of the training images held out as a validation split (not trained
    on). pqd uses it, never the test split, for its early checks (the teacher's chance-level
    check) and for ``pqd analyze`` sensitivity; 0 means those checks use a slice of the
    training split instead (and ``analyze`` the test split).

    ``image_size`` (folders): images of any size are resized (shorter side to ``resize_size``,
    default ``round(image_size / 0.875)``) and centre-cropped to ``image_size`` squares for
    evaluation and deployment; training augments with RandomResizedCrop (area ``scale``) + flip.
    ``mean``/``std``: given, or computed from the training split. The decoded set stays in memory
    when it fits ``max_memory_gb``, else it is streamed from disk by ``workers`` processes
    (default: up to 4). None keeps the same-size behaviour (32x32 research data)."""

    dataset: str = "digits"
    root: str | None = None
    download: bool = False
    val_fraction: float = 0.0
    train_subset: int | None = None
    test_subset: int | None = None
    augment: bool = True
    cache_dir: str | None = None
    image_size: int | None = None
    resize_size: int | None = None
    scale: tuple[float, ...] = (0.08, 1.0)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    max_memory_gb: float = 4.0
    workers: int | None = None

    def __post_init__(self) -> None:
        _choice("data.dataset", self.dataset, DATASETS)
        if self.dataset == "folder" and not self.root:
            _fail("data.root", "dataset 'folder' needs data.root: a directory or .tar.gz with train/<class>/* and test/<class>/*")
        _range("data.val_fraction", self.val_fraction, 0.0, 0.5, hi_open=True)
        for k in ("train_subset", "test_subset"):
            v = getattr(self, k)
            if v is not None:
                _range(f"data.{k}", v, 1)
        if self.image_size is not None:
            _range("data.image_size", self.image_size, 8)
            if self.dataset != "folder":
                _fail("data.image_size", f"resizing is for image folders (data.dataset: folder), not {self.dataset!r}")
        if self.resize_size is not None:
            if self.image_size is None:
                _fail("data.resize_size", "needs data.image_size (the crop taken after the resize)")
            _range("data.resize_size", self.resize_size, self.image_size)
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1] <= 1:
            _fail("data.scale", f"{list(self.scale)} is not [low, high] with 0 < low <= high <= 1 (share of the image area)")
        for k in ("mean", "std"):
            v = getattr(self, k)
            if v is not None and len(v) != 3:
                _fail(f"data.{k}", f"needs 3 values (R, G, B), got {list(v)}")
        if (self.mean is None) != (self.std is None):
            _fail("data.mean", "give data.mean and data.std together (or neither: computed from the training split)")
        if self.std is not None and min(self.std) <= 0:
            _fail("data.std", f"{list(self.std)}: every value must be positive")
        _range("data.max_memory_gb", self.max_memory_gb, 0.0)
        if self.workers is not None:
            _range("data.workers", self.workers, 0)


@dataclass(frozen=True)
class TrainConfig(Section):
    """Optimiser and loop settings shared by every stage (each stage sets its own lr/epochs)."""

    batch_size: int = 128
    eval_batch_size: int = 500
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.0
    channels_last: bool = True
    amp: bool = True
    threads: int | None = None
    progress: bool = True
    tracker: str = "none"  # none | tensorboard | mlflow: per-epoch and final metrics to your tracker
    tracker_dir: str | None = None  # default: RUN_DIR/tracker

    def __post_init__(self) -> None:
        _choice("train.tracker", self.tracker, ("none", "tensorboard", "mlflow"))
        _range("train.batch_size", self.batch_size, 1)
        _range("train.eval_batch_size", self.eval_batch_size, 1)
        _range("train.momentum", self.momentum, 0.0, 1.0, hi_open=True)
        _range("train.weight_decay", self.weight_decay, 0.0)
        _range("train.warmup_epochs", self.warmup_epochs, 0.0)
        _range("train.label_smoothing", self.label_smoothing, 0.0, 1.0, hi_open=True)
        if self.threads is not None:
            _range("train.threads", self.threads, 1, 4096)


@dataclass(frozen=True)
class TeacherConfig(Section):
    """The dense FP32 teacher: trained for ``epochs`` or loaded from ``weights`` (safetensors)."""

    epochs: int = 30
    lr: float = 0.1
    weights: str | None = None

    def __post_init__(self) -> None:
        _range("teacher.epochs", self.epochs, 0)
        _range("teacher.lr", self.lr, 0.0)
        if self.weights is None and self.epochs == 0:
            _fail("teacher.epochs", "is 0 and teacher.weights is not set: give the teacher epochs to train or a weights file to load")


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
    exclude: tuple[str, ...] = ("@first",)
    lr: float = 0.01
    prune_fraction: float = 0.75

    def __post_init__(self) -> None:
        _range("prune.sparsity", self.sparsity, 0.0, 1.0, hi_open=True)
        _choice("prune.schedule", self.schedule, ("gradual", "oneshot"))
        _choice("prune.criterion", self.criterion, ("magnitude", "random"))
        _range("prune.lr", self.lr, 0.0)
        _range("prune.prune_fraction", self.prune_fraction, 0.0, 1.0)


@dataclass(frozen=True)
class QuantizeConfig(Section):
    """INT8 quantization for x86: per-channel symmetric weights, per-tensor affine
    activations, BN folded. ``mode``: 'qat' (train) or 'ptq' (static calibration only).
    Observers and BN statistics freeze for the last ``freeze_fraction`` of QAT epochs.
    ``reduce_range``: 7-bit activations, only needed for deployment CPUs without VNNI.
    ``mode: dynamic``: weights-only int8 PTQ of the Linear layers (activations quantized at run
    time; convolutions stay FP32). ``granularity`` ('per_channel' | 'per_tensor') and
    ``symmetric`` choose the weight scheme (see :mod:`pqd.qoptions`, docs/QUANTIZATION.md).
    ``leaf_modules``: submodules torch.fx must not trace into (an untraceable user block):
    submodule paths ('layer3.0') or classes ('package.module:Class'); they stay FP32."""

    mode: str = "qat"
    lr: float = 0.005
    freeze_fraction: float = 0.25
    calibration_batches: int = 16
    reduce_range: bool = False
    granularity: str = "per_channel"
    symmetric: bool = True
    leaf_modules: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _choice("quantize.mode", self.mode, ("qat", "ptq", "dynamic"))
        _choice("quantize.granularity", self.granularity, ("per_channel", "per_tensor"))
        _range("quantize.lr", self.lr, 0.0)
        _range("quantize.freeze_fraction", self.freeze_fraction, 0.0, 1.0)
        _range("quantize.calibration_batches", self.calibration_batches, 1)


@dataclass(frozen=True)
class DistillConfig(Section):
    """Response-based KD: ``kd_weight · T² · KL(softmax(t/T) || softmax(s/T)) + alpha · CE``.

    ``kd_weight: 0`` is the KD-off control: the same stage, epochs, lr and schedule with the
    cross-entropy term alone and no teacher forward ("more training, no teacher").

    ``kind`` picks the KD variant (:mod:`pqd.kd_variants`): 'response' (above), 'feature'
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
        _choice("distill.kind", self.kind, ("response", "feature", "attention", "mutual", "self"))
        if self.beta is not None:
            _range("distill.beta", self.beta, 0.0)
        _range("distill.peers", self.peers, 1, 8)
        _range("distill.temperature", self.temperature, 0.1, 100.0)
        _range("distill.alpha", self.alpha, 0.0)
        _range("distill.lr", self.lr, 0.0)
        _range("distill.kd_weight", self.kd_weight, 0.0)
        if self.kd_weight == 0 and self.alpha == 0:
            _fail("distill.kd_weight", "kd_weight 0 and alpha 0 together leave no loss; set alpha > 0 for the KD-off "
                  "control (cross-entropy only) or kd_weight > 0")


def _stage_registry() -> types.ModuleType:
    # imported at call time: pqd.stages.registry sits in pqd.stages, whose modules import this one
    from pqd.stages import registry

    return registry


STRUCTURED_RUNTIMES = ("openvino", "onnxruntime", "pytorch")
STRUCTURED_CRITERIA = ("l1", "l2", "bn", "taylor", "random")
STRUCTURED_SELECT = ("greedy", "adapted_bn")


def _sfail(key: str, msg: str) -> typing.NoReturn:
    raise ConfigError(f"structured.{key}: {msg}")


@dataclass(frozen=True)
class StructuredConfig(Section):
    """Structured (channel) pruning under a latency budget measured on the deployment runtime.

    Budget: ``budget_ms``, or ``budget_fraction`` × the dense model's INT8 latency (exactly
    one); ``size_budget_mb``: optional cap on INT8 weight bytes. Target: ``runtime``
    ('openvino', 'onnxruntime', 'pytorch'), ``batch``, ``threads``. ``importance``: 'l1',
    'l2', 'bn', 'taylor', 'random'; ``sensitivity``: a CSV from ``pqd analyze`` to minimise
    predicted accuracy loss instead. Channel counts are multiples of ``round_to``; a group
    keeps at least ``min_keep`` of its channels. ``samples``: measured width configurations
    for the latency model (cached per machine and target); ``runs``: timed calls per
    measurement; ``max_iters``: measure-and-correct rounds; ``margin``: correct until the
    measured latency is at most (1 - margin) × the budget, room for the measurement's
    run-to-run spread. ``select``: 'greedy' (one greedy on the importance or sensitivity
    cost) or 'adapted_bn' (several width recipes under the same target, uniform scaling among
    them, ranked by top-1 after re-estimating BN statistics on ``select_images`` training
    images; :mod:`pqd.structured.select`). The stage then fine-tunes for
    its epochs at ``lr``, against the dense teacher's soft targets when ``distill`` is true
    (temperature and alpha of the ``distill`` section), else with cross-entropy. ``ignore``:
    module paths whose output channels are never pruned.
    """

    budget_fraction: float | None = 0.5
    budget_ms: float | None = None
    size_budget_mb: float | None = None
    runtime: str = "openvino"
    batch: int = 1
    threads: int = 2
    importance: str = "l1"
    sensitivity: str | None = None
    round_to: int = 8
    min_keep: float = 0.1
    samples: int = 12
    runs: int = 100
    max_iters: int = 4
    margin: float = 0.0
    select: str = "greedy"
    select_images: int = 512
    lr: float = 0.01
    distill: bool = True
    ignore: tuple[str, ...] = ()
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if (self.budget_ms is None) == (self.budget_fraction is None):
            _sfail("budget_fraction", "give exactly one of structured.budget_fraction and structured.budget_ms "
                  "(set the other to null)")
        if self.budget_fraction is not None and not 0 < self.budget_fraction <= 1:
            _sfail("budget_fraction", f"{self.budget_fraction!r} must be in (0, 1]")
        if not 0 <= self.margin < 0.5:
            _sfail("margin", f"{self.margin!r} must be in [0, 0.5): the share of the budget kept free for run-to-run spread")
        if self.budget_ms is not None and not self.budget_ms > 0:
            _sfail("budget_ms", f"{self.budget_ms!r} must be > 0")
        if self.size_budget_mb is not None and not self.size_budget_mb > 0:
            _sfail("size_budget_mb", f"{self.size_budget_mb!r} must be > 0")
        if self.runtime not in STRUCTURED_RUNTIMES:
            _sfail("runtime", f"{self.runtime!r} is not valid; choose one of {', '.join(map(repr, STRUCTURED_RUNTIMES))}")
        if self.importance not in STRUCTURED_CRITERIA:
            _sfail("importance", f"{self.importance!r} is not valid; choose one of {', '.join(map(repr, STRUCTURED_CRITERIA))}")
        for k in ("batch", "threads", "round_to", "samples", "runs", "max_iters"):
            if getattr(self, k) < 1:
                _sfail(k, f"{getattr(self, k)!r} must be >= 1")
        if self.samples < 2:
            _sfail("samples", f"{self.samples} must be >= 2 (the latency model is fitted on them)")
        if not 0 < self.min_keep <= 1:
            _sfail("min_keep", f"{self.min_keep!r} must be in (0, 1]")
        if not self.lr >= 0:
            _sfail("lr", f"{self.lr!r} must be >= 0")
        if self.select not in STRUCTURED_SELECT:
            _sfail("select", f"{self.select!r} is not valid; choose one of {', '.join(map(repr, STRUCTURED_SELECT))}")
        if self.select_images < 16:
            _sfail("select_images", f"{self.select_images!r} must be >= 16 (BN statistics are re-estimated on them)")
        if self.select == "adapted_bn" and self.size_budget_mb is not None:
            _sfail("select", "'adapted_bn' does not take a size budget yet; use select 'greedy' with size_budget_mb")


@dataclass(frozen=True)
class StageSpec(Section):
    """One entry of the stage list: a registered stage (:mod:`pqd.stages.registry`) and its epochs."""

    stage: str = "prune"
    epochs: int = 0

    def __post_init__(self) -> None:
        try:
            canonical = _stage_registry().get_stage(self.stage).name
        except ConfigError:
            _choice("stages[].stage", self.stage, [s.name for s in _stage_registry().list_stages()])
        object.__setattr__(self, "stage", canonical)
        _range(f"stages.{self.stage}.epochs", self.epochs, 0)

    @property
    def letter(self) -> str:
        stage: Stage = _stage_registry().get_stage(self.stage)
        return stage.letter


def _stage_help() -> str:
    return "/".join(f"{s.letter}/{s.name}" for s in _stage_registry().list_stages())


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
                full = _stage_registry().get_stage(name.strip()).name
            except ConfigError:
                _fail("stages", f"unknown stage {name!r} in {spec!r}; use {_stage_help()}, e.g. 'P:20,Q:40,D:40'")
            try:
                n = int(epochs) if epochs.strip() else 0
            except ValueError:
                _fail("stages", f"epochs for {name!r} must be an integer, got {epochs!r} in {spec!r}")
            out.append(StageSpec(full, n))
        return tuple(out)
    if not isinstance(spec, (list, tuple)):
        _fail("stages", f"expected a string like 'P:20,Q:40,D:40' or a list, got {spec!r}")
    return tuple(s if isinstance(s, StageSpec) else StageSpec.from_dict(s, prefix="stages[].") for s in spec)


@dataclass(frozen=True)
class MeasureConfig(Section):
    """Latency measurement: fixed threads, warm-up, many interleaved runs. ``inherit_env``: time
    in this process's threading environment (OMP_*, KMP_*, MKL_* ...) as it is, instead of the
    controlled one every latency worker gets (:func:`pqd.measure.workers.worker_environment`)."""

    threads: int = 2
    warmup: int = 20
    runs: int = 200
    batch_sizes: tuple[int, ...] = (1, 64)
    large_batch_runs: int = 20
    inherit_env: bool = False

    def __post_init__(self) -> None:
        _range("measure.threads", self.threads, 1, 4096)
        _range("measure.warmup", self.warmup, 0)
        _range("measure.runs", self.runs, 1)
        _range("measure.large_batch_runs", self.large_batch_runs, 1)
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            _fail("measure.batch_sizes", f"needs positive batch sizes, got {list(self.batch_sizes)}")


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

    def __post_init__(self) -> None:
        _range("seed", self.seed, 0, 2**63 - 1)  # torch.manual_seed overflows beyond 64 bits
        if isinstance(self.stages, str) or (self.stages and not isinstance(self.stages[0], StageSpec)):
            object.__setattr__(self, "stages", parse_stages(self.stages))
        names = [s.stage for s in self.stages]
        reg = _stage_registry()
        kinds = [reg.get_stage(n) for n in names]
        quantizing = [i for i, k in enumerate(kinds) if k.quantizes]
        if len(quantizing) > 1:
            _fail("stages", f"{self.stage_string()} quantizes {len(quantizing)} times; a student is quantized once, "
                            "so keep one quantizing stage")
        structural = [i for i, k in enumerate(kinds) if k.structural]
        if quantizing and structural and max(structural) > quantizing[0]:
            works = [s for s, k in zip(self.stages, kinds, strict=True) if k.structural] + [s for s, k in zip(self.stages, kinds, strict=True) if not k.structural]
            _fail("stages", f"{self.stage_string()} changes layer shapes after quantizing; structural stages must come before "
                            f"any quantizing stage, e.g. {','.join(f'{s.letter}:{s.epochs}' for s in works)}")
        if self.quantize.mode in ("ptq", "dynamic") and "quantize" in names:
            mode = self.quantize.mode
            if names[-1] != "quantize":
                _fail("quantize.mode", f"{mode!r} calibrates without training, so quantize must be the last stage; use mode 'qat' to train after quantizing")
            if self.stage_epochs("quantize"):
                _fail("stages", f"quantize.mode {mode!r} takes no epochs; write 'Q:0' (or 'Q') or use mode 'qat'")
        if self.quantize.mode == "dynamic" and "joint" in names:
            _fail("quantize.mode", "the joint stage trains with fake quantization; use mode 'qat' (or 'ptq') with it")
        for s in self.stages:
            if s.epochs == 0 and s.stage == "distill":
                _fail("stages", "distill needs at least one epoch, e.g. 'D:10'")
            if s.epochs == 0 and s.stage in ("imp", "joint"):
                _fail("stages", f"{s.stage} trains, so it needs epochs, e.g. '{s.letter}:6'")
            if s.epochs == 0 and s.stage == "prune" and self.prune.schedule == "gradual":
                _fail("prune.schedule", "'gradual' needs prune epochs ('P:N' with N>0); use schedule 'oneshot' for no fine-tuning")
        if self.quantize.mode == "qat" and "quantize" in names and self.stage_epochs("quantize") == 0:
            _fail("stages", "quantize.mode 'qat' needs epochs ('Q:N' with N>0); use quantize.mode 'ptq' for calibration only")

    @classmethod
    def from_dict(cls: type[_S], data: Mapping[str, Any] | None, *, prefix: str = "") -> _S:
        if data is not None and not isinstance(data, Mapping):
            _fail("config", f"expected a mapping of sections (seed, stages, model, ...), got {type(data).__name__}")
        data = dict(data or {})
        if "stages" in data:
            data["stages"] = parse_stages(data["stages"])
        return super().from_dict(data, prefix=prefix)

    def to_dict(self) -> dict[str, Any]:
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
        reg = _stage_registry()
        return any(reg.get_stage(s.stage).quantizes for s in self.stages)




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
    exclude: tuple[str, ...] = ("@first",)

    def __post_init__(self) -> None:
        _range("imp.rounds", self.rounds, 1, 100)
        _range("imp.fraction", self.fraction, 0.0, 1.0, hi_open=True)
        if self.fraction <= 0.0:
            _fail("imp.fraction", f"{self.fraction!r} must be > 0 (the fraction of remaining weights pruned each round)")
        if isinstance(self.rewind, str):
            _choice("imp.rewind", self.rewind, ("init", "start"))
        else:
            _range("imp.rewind", self.rewind, 0)
        _range("imp.lr", self.lr, 0.0)

    @property
    def sparsity(self) -> float:
        """The fraction of the prunable weights the stage prunes in all."""
        return 1.0 - (1.0 - self.fraction) ** self.rounds


@dataclass(frozen=True)
class JointConfig(Section):
    """Joint compression (JPQD-like; stage 'joint' / 'J'): in one training loop, global magnitude
    pruning on the AGP schedule (``sparsity``, ``prune_fraction``, ``exclude`` as in ``prune``),
    fake quantization (the ``quantize`` section's scheme) and response KD from the teacher
    (``temperature``; ``alpha`` weighs the hard-label CE; ``kd: false`` trains on labels only)."""

    sparsity: float = 0.9
    prune_fraction: float = 0.75
    exclude: tuple[str, ...] = ("@first",)
    lr: float = 0.005
    kd: bool = True
    temperature: float = 4.0
    alpha: float = 0.5

    def __post_init__(self) -> None:
        _range("joint.sparsity", self.sparsity, 0.0, 1.0, hi_open=True)
        _range("joint.prune_fraction", self.prune_fraction, 0.0, 1.0)
        _range("joint.lr", self.lr, 0.0)
        _range("joint.temperature", self.temperature, 0.1, 100.0)
        _range("joint.alpha", self.alpha, 0.0)


def _parse_scalar(text: str, where: str = "--set value") -> Any:
    from pqd.safeyaml import parse_scalar  # bounded YAML; '1e-3' is a float

    return parse_scalar(text, where=where)


def apply_overrides(data: Mapping[str, Any], overrides: typing.Sequence[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values parsed as YAML scalars) to a config dict."""
    out = _deep_copy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set prune.sparsity=0.8")
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {p!r} is not a section")
        node[leaf] = _parse_scalar(raw, where=f"--set {item!r}: {key}: the value")
    return out


def _deep_copy(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in d.items()}


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> RunConfig:
    """Read a YAML config file (or the defaults when ``path`` is None), apply overrides, validate.

    The file is read with :func:`pqd.safeyaml.load_yaml` (size, depth, node and alias limits:
    YAML bombs are refused); nothing named in it is imported here."""
    from pqd.safeyaml import load_yaml

    data: dict[str, Any] = {}
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
