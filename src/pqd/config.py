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
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from pqd.errors import ConfigError
from pqd.safety.safeyaml import parse_scalar

EXTERNAL_LIBRARIES = ("torchvision", "timm")  # model.name 'torchvision:<arch>' / 'timm:<arch>' (pqd.models.external)


def is_external(name: str) -> bool:
    """Whether ``name`` is ``torchvision:<name>`` or ``timm:<name>``."""
    return name.partition(":")[0] in EXTERNAL_LIBRARIES and bool(name.partition(":")[2])


_S = TypeVar("_S", bound="Section")

DATASETS = ("digits", "cifar10", "cifar100", "folder")


def fail(key: str, msg: str) -> typing.NoReturn:
    raise ConfigError(f"{key}: {msg}")


def choice(key: str, value: Any, choices: typing.Sequence[str]) -> None:
    if value not in choices:
        fail(key, f"{value!r} is not valid; choose one of {', '.join(map(repr, choices))}")


def in_range(
    key: str, value: float, lo: float | None = None, hi: float | None = None, *, hi_open: bool = False
) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        fail(key, f"{value!r} is not a finite number")
    if lo is not None and value < lo:
        fail(key, f"{value!r} is below the minimum {lo}")
    if hi is not None and (value >= hi if hi_open else value > hi):
        fail(key, f"{value!r} must be {'<' if hi_open else '<='} {hi}")


class Section:
    """Mixin: dict round-trip with validation of keys and types."""

    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]  # every Section is a dataclass

    @classmethod
    def from_dict(cls: type[_S], data: Mapping[str, Any] | None, *, prefix: str = "") -> _S:
        data = {} if data is None else data
        if not isinstance(data, Mapping):
            fail(prefix.rstrip(".") or "config", f"expected a mapping, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in data.items():
            if key not in fields:
                close = difflib.get_close_matches(str(key), list(fields), n=1)
                hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
                fail(f"{prefix}{key}", f"unknown key.{hint} Valid keys: {', '.join(fields)}")
            kwargs[key] = coerce(f"{prefix}{key}", value, hints[key])
        try:
            return cls(**kwargs)
        except ConfigError as exc:
            if prefix and not str(exc).startswith(
                prefix.split("[")[0].rstrip(".")
            ):  # 'stages[].' vs 'stages.prune.epochs'
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


def coerce(key: str, value: Any, hint: Any) -> Any:
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
                return coerce(key, value, arg)
            except ConfigError as exc:
                errors.append(str(exc))
        fail(key, f"{value!r} has the wrong type ({' / '.join(e.split(': ', 1)[-1] for e in errors)})")
    if isinstance(hint, type) and issubclass(hint, Section):
        return value if isinstance(value, hint) else hint.from_dict(value, prefix=f"{key}.")
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            fail(key, f"expected a list, got {type(value).__name__} {value!r}")
        (arg, *_) = typing.get_args(hint)
        return tuple(coerce(f"{key}[{i}]", v, arg) for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            fail(key, f"expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail(key, f"expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail(key, f"expected a number, got {value!r}")
        try:
            return float(value)
        except OverflowError:
            fail(key, f"{value!r} is too large")
    if hint is str:
        if not isinstance(value, str):
            fail(key, f"expected a string, got {value!r}")
        return value
    if hint is Any:
        return value
    raise TypeError(f"unsupported config type {hint!r} for {key}")  # a pqd bug, not user input


@dataclass(frozen=True)
class ModelConfig(Section):
    """Backbone: a registry name (``pqd.list_models()``), ``torchvision:<name>`` / ``timm:<name>``
    (:mod:`pqd.models.external`), or ``package.module:factory``."""

    name: str = "resnet18"
    width: float = 1.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if ":" in self.name and not is_external(
            self.name
        ):  # a registry name is checked against the registry by the run config
            module, _, attr = self.name.partition(":")
            if not (all(p.isidentifier() for p in module.split(".")) and attr.isidentifier()):
                fail("model.name", f"{self.name!r} is not an import path 'package.module:factory'")
        in_range("model.width", self.width, 0.0625, 4.0)
        in_range("model.dropout", self.dropout, 0.0, 1.0, hi_open=True)


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
        choice("data.dataset", self.dataset, DATASETS)
        if self.dataset == "folder" and not self.root:
            fail(
                "data.root",
                "dataset 'folder' needs data.root: a directory or .tar.gz with train/<class>/* and test/<class>/*",
            )
        in_range("data.val_fraction", self.val_fraction, 0.0, 0.5, hi_open=True)
        for k in ("train_subset", "test_subset"):
            v = getattr(self, k)
            if v is not None:
                in_range(f"data.{k}", v, 1)
        if self.image_size is not None:
            in_range("data.image_size", self.image_size, 8)
            if self.dataset != "folder":
                fail("data.image_size", f"resizing is for image folders (data.dataset: folder), not {self.dataset!r}")
        if self.resize_size is not None:
            if self.image_size is None:
                fail("data.resize_size", "needs data.image_size (the crop taken after the resize)")
            in_range("data.resize_size", self.resize_size, self.image_size)
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1] <= 1:
            fail(
                "data.scale",
                f"{list(self.scale)} is not [low, high] with 0 < low <= high <= 1 (share of the image area)",
            )
        for k in ("mean", "std"):
            v = getattr(self, k)
            if v is not None and len(v) != 3:
                fail(f"data.{k}", f"needs 3 values (R, G, B), got {list(v)}")
        if (self.mean is None) != (self.std is None):
            fail("data.mean", "give data.mean and data.std together (or neither: computed from the training split)")
        if self.std is not None and min(self.std) <= 0:
            fail("data.std", f"{list(self.std)}: every value must be positive")
        in_range("data.max_memory_gb", self.max_memory_gb, 0.0)
        if self.workers is not None:
            in_range("data.workers", self.workers, 0)


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
        choice("train.tracker", self.tracker, ("none", "tensorboard", "mlflow"))
        in_range("train.batch_size", self.batch_size, 1)
        in_range("train.eval_batch_size", self.eval_batch_size, 1)
        in_range("train.momentum", self.momentum, 0.0, 1.0, hi_open=True)
        in_range("train.weight_decay", self.weight_decay, 0.0)
        in_range("train.warmup_epochs", self.warmup_epochs, 0.0)
        in_range("train.label_smoothing", self.label_smoothing, 0.0, 1.0, hi_open=True)
        if self.threads is not None:
            in_range("train.threads", self.threads, 1, 4096)


@dataclass(frozen=True)
class TeacherConfig(Section):
    """The dense FP32 teacher: trained for ``epochs`` or loaded from ``weights`` (safetensors)."""

    epochs: int = 30
    lr: float = 0.1
    weights: str | None = None

    def __post_init__(self) -> None:
        in_range("teacher.epochs", self.epochs, 0)
        in_range("teacher.lr", self.lr, 0.0)
        if self.weights is None and self.epochs == 0:
            fail(
                "teacher.epochs",
                "is 0 and teacher.weights is not set: give the teacher epochs to train or a weights file to load",
            )


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
        in_range("measure.threads", self.threads, 1, 4096)
        in_range("measure.warmup", self.warmup, 0)
        in_range("measure.runs", self.runs, 1)
        in_range("measure.large_batch_runs", self.large_batch_runs, 1)
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            fail("measure.batch_sizes", f"needs positive batch sizes, got {list(self.batch_sizes)}")


MEASURE = MeasureConfig()  # the measurement defaults, named once for every signature that takes them


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
        node[leaf] = parse_scalar(raw, where=f"--set {item!r}: {key}: the value")
    return out


def _deep_copy(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in d.items()}
