"""The ``tune:`` section of a ``pqd tune`` config and the loader that splits a tune file into the
run config (model, data, teacher, train, measure ...) and the tune section."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pqd.config import Section, apply_overrides, choice, fail, in_range
from pqd.errors import ConfigError
from pqd.run.config import RunConfig, read_config_file

TUNE_RUNTIMES = ("openvino", "onnxruntime", "pytorch")
PASS_RULES = ("point", "upper")


@dataclass(frozen=True)
class TuneConfig(Section):
    """What ``pqd tune`` searches for: the fastest deployable model within ``max_drop``.

    Tolerance: ``max_drop`` top-1 points below the dense FP32 model (``relative``: percent of its
    top-1 instead), judged on a validation split held out from training (``val_fraction`` of the
    training split when the data has none; never the test split), paired on the same images.
    ``rule``: 'point' (a candidate passes when its measured drop is at most ``max_drop``) or 'upper'
    (when the upper end of the drop's 95% interval is).
    Target: ``runtime``, ``batch``, ``threads``; optional ``latency_budget_ms`` or
    ``latency_budget_fraction`` (of dense INT8, measured) and ``size_budget_mb`` (file on disk).
    Training budget: ``epochs`` over all trained candidates together (None: scaled to the training
    split, stated before the first candidate) or ``minutes`` (converted to epochs with the measured
    training speed); ``candidate_epochs`` per trained candidate (None: derived).
    Ladder: up to ``fallback_layers`` layers left FP32 when plain PTQ misses; structured latency
    fractions ``fractions`` probed in order, then bisection until the fraction interval is below
    ``min_step``, at most ``max_structured`` structured candidates. ``runs``: timed calls per
    candidate in the final interleaved latency measurement.
    """

    max_drop: float = 1.0
    relative: bool = False
    rule: str = "point"
    val_fraction: float = 0.1
    runtime: str = "openvino"
    batch: int = 1
    threads: int = 2
    latency_budget_ms: float | None = None
    latency_budget_fraction: float | None = None
    size_budget_mb: float | None = None
    epochs: int | None = None
    minutes: float | None = None
    candidate_epochs: int | None = None
    fallback_layers: int = 4
    fractions: tuple[float, ...] = (0.75, 0.5, 0.35)
    min_step: float = 0.05
    max_structured: int = 5
    runs: int = 200

    def __post_init__(self) -> None:
        in_range("tune.max_drop", self.max_drop, 0.0, 100.0)
        choice("tune.rule", self.rule, PASS_RULES)
        in_range("tune.val_fraction", self.val_fraction, 0.0, 0.5, hi_open=True)
        choice("tune.runtime", self.runtime, TUNE_RUNTIMES)
        in_range("tune.batch", self.batch, 1)
        in_range("tune.threads", self.threads, 1, 4096)
        if self.latency_budget_ms is not None and self.latency_budget_fraction is not None:
            fail("tune.latency_budget_ms", "give latency_budget_ms or latency_budget_fraction, not both")
        if self.latency_budget_ms is not None and not self.latency_budget_ms > 0:
            fail("tune.latency_budget_ms", f"{self.latency_budget_ms!r} must be > 0")
        if self.latency_budget_fraction is not None and not 0 < self.latency_budget_fraction <= 1:
            fail("tune.latency_budget_fraction", f"{self.latency_budget_fraction!r} must be in (0, 1]")
        if self.size_budget_mb is not None and not self.size_budget_mb > 0:
            fail("tune.size_budget_mb", f"{self.size_budget_mb!r} must be > 0")
        if self.epochs is not None and self.minutes is not None:
            fail("tune.epochs", "give the training budget as epochs or as minutes, not both")
        if self.epochs is not None:
            in_range("tune.epochs", self.epochs, 0)
        if self.minutes is not None and not self.minutes > 0:
            fail("tune.minutes", f"{self.minutes!r} must be > 0")
        if self.candidate_epochs is not None:
            in_range("tune.candidate_epochs", self.candidate_epochs, 1)
        in_range("tune.fallback_layers", self.fallback_layers, 0)
        if not self.fractions or any(not 0 < f < 1 for f in self.fractions):
            fail("tune.fractions", f"{list(self.fractions)}: give latency fractions in (0, 1), e.g. [0.75, 0.5, 0.35]")
        if list(self.fractions) != sorted(self.fractions, reverse=True):
            fail("tune.fractions", f"{list(self.fractions)}: list them from the largest down (cheapest cut first)")
        in_range("tune.min_step", self.min_step, 0.0, 0.5)
        in_range("tune.max_structured", self.max_structured, 0)
        in_range("tune.runs", self.runs, 1)

    def max_drop_points(self, dense_top1: float) -> float:
        """The tolerance in top-1 points (``dense_top1`` a fraction in [0, 1])."""
        return self.max_drop * dense_top1 if self.relative else self.max_drop


def split_tune_dict(data: dict[str, Any]) -> tuple[RunConfig, TuneConfig]:
    """A tune file's mapping -> (run config, tune section). The run config's ``stages`` are the tune's
    to choose: a ``stages`` key is refused rather than silently ignored."""
    data = dict(data)
    if "stages" in data:
        raise ConfigError("stages: pqd tune chooses the stages itself; remove the key (pqd run takes a stage list)")
    tune = data.pop("tune", None) or {}
    if not isinstance(tune, dict):
        fail("tune", f"expected a mapping of tune settings, got {type(tune).__name__}")
    return RunConfig.from_dict(data | {"stages": ""}), TuneConfig.from_dict(tune, prefix="tune.")


def load_tune_config(path: str | Path, overrides: tuple[str, ...] | list[str] = ()) -> tuple[RunConfig, TuneConfig]:
    """Read a ``pqd tune`` YAML file (the run config's sections plus ``tune:``), apply ``--set`` overrides."""
    return split_tune_dict(apply_overrides(read_config_file(path), overrides))
