"""The typed schema of ``metrics.json``: written once (:func:`pqd.run.pipeline.finalize`), read
everywhere (CLI summary, sweep table, report, bench) through these fields.

Every class round-trips: ``Metrics.from_dict(m.to_dict()) == m``. Keys other commands add to a
run's metrics.json (``pqd bench`` adds ``bench``) are kept in :attr:`Metrics.extra` and written
back unchanged. Optional values are omitted from the JSON when they are None.

Schema history: 1 — the untyped dict of pqd ≤ 0.x; 2 — this module: adds ``stage_records``,
``pruned``, ``quantize_mode``, ``prune_criterion``, ``image_shape``; stage lists may repeat
or be empty (a dense run); 3 — accuracy gains Wilson intervals (``*_top1_ci``), ``test_n``,
``test_full_split``, prediction files; ``speedup`` (labelled ratios, every one naming both
sides and runtime; the pipeline's own teacher-vs-final ratio is ``pytorch_eager_extra``);
4 — ``latency_env``: the threading environment the latency was measured in (absent before).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pqd.errors import CheckpointError

SCHEMA = 4
READABLE = (3, SCHEMA)  # schema 3 files read without latency_env; older ones are refused


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def _known(cls, d: Mapping[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names}


@dataclass
class Accuracy:
    """Top-1 on the test split (fractions) and prediction agreement between models.

    ``*_top1_ci``: :func:`pqd.measure.stats.top1_record` of the same top-1
    (``{top1, ci_low, ci_high, n, method, confidence}``, Wilson 95%). ``test_n``: images
    evaluated; ``test_full_split``: False when ``data.test_subset`` chose a subset (then
    ``test_subset_seed`` is its fixed seed). ``predictions_file`` / ``teacher_predictions_file``:
    per-image argmax (int16, test-split order) in the run folder, for paired tests between runs
    on the same test set (:attr:`test_set`).
    """

    teacher_top1: float
    final_top1: float
    final_vs_teacher_agreement: float | None = None  # None only in metrics older than schema 1's final form
    fake_quant_top1: float | None = None  # QAT: the fake-quant student before conversion
    int8_vs_fake_quant_agreement: float | None = None
    pre_conversion_fp32_top1: float | None = None  # PTQ: the calibrated FP32 model before conversion
    int8_vs_fp32_agreement: float | None = None
    teacher_top1_ci: dict[str, Any] | None = None
    final_top1_ci: dict[str, Any] | None = None
    fake_quant_top1_ci: dict[str, Any] | None = None
    pre_conversion_fp32_top1_ci: dict[str, Any] | None = None
    test_n: int | None = None  # None in metrics older than schema 3
    test_full_split: bool | None = None
    test_subset_seed: int | None = None
    predictions_file: str | None = None
    teacher_predictions_file: str | None = None

    @property
    def test_set(self) -> tuple | None:
        """What makes two runs' predictions comparable image by image (with the dataset name)."""
        if self.test_n is None:
            return None
        return (self.test_n, bool(self.test_full_split), None if self.test_full_split else self.test_subset_seed)

    @property
    def test_label(self) -> str:
        """'full test split (n=10000)' or 'test subset n=2000 (seed 0)'; '' when not recorded."""
        if self.test_n is None:
            return ""
        if self.test_full_split:
            return f"full test split (n={self.test_n})"
        return f"test subset n={self.test_n} (seed {self.test_subset_seed})"

    def to_dict(self) -> dict[str, Any]:
        return _drop_none(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Accuracy:
        return cls(**_known(cls, d))


@dataclass
class Sparsity:
    """``target``: the configured prune target (0 when nothing prunes); ``achieved``: zero weights
    of the prunable layers of the final student; ``achieved_int8``: the same in the INT8 model."""

    target: float
    achieved: float
    achieved_int8: float | None
    prunable_layers: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Sparsity:
        return cls(**{"achieved_int8": None, "prunable_layers": 0} | _known(cls, d))


@dataclass
class Sizes:
    """Bytes on disk (JSON key ``size_bytes``)."""

    teacher_fp32: int
    final: int
    final_file: str
    compact_int8: int | None = None
    compact_file: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return _drop_none(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Sizes:
        return cls(**_known(cls, d))


@dataclass
class LatencyRecord:
    """One (model, batch) timing; harness details (blocks, threads, ...) stay in ``extra``."""

    model: str
    batch: int
    median_ms: float
    p90_ms: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return (
            _drop_none({"model": self.model, "batch": self.batch, "median_ms": self.median_ms, "p90_ms": self.p90_ms})
            | self.extra
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LatencyRecord:
        core = ("model", "batch", "median_ms", "p90_ms")
        return cls(
            d["model"], d["batch"], d["median_ms"], d.get("p90_ms"), extra={k: v for k, v in d.items() if k not in core}
        )


@dataclass
class Quantization:
    backend: str
    float_modules: list[dict[str, str]] = field(default_factory=list)  # ops left FP32 in the INT8 model

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Quantization:
        return cls(**_known(cls, d))


@dataclass
class StageRecord:
    """One entry of the stage list as it ran: what it was, and the facts it recorded
    (``Student.records`` under its label, e.g. structured widths)."""

    index: int
    stage: str
    letter: str
    epochs: int
    quantizes: bool = False
    structural: bool = False
    records: dict[str, Any] = field(default_factory=dict)
    wall_time_s: float | None = None  # None when the stage ran in an earlier (interrupted) invocation

    @property
    def label(self) -> str:
        return f"{self.index + 1}_{self.stage}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StageRecord:
        return cls(**_known(cls, d))


@dataclass
class Metrics:
    """A run's metrics.json."""

    model: str
    width: float
    dataset: str
    num_classes: int
    stages: str  # 'P:20,Q:40,D:40'; '' for a dense run
    stage_order: list[str]
    epochs: dict[str, int]  # teacher and the total per stage name
    teacher_source: str
    final_form: str  # 'int8' | 'fp32'
    accuracy: Accuracy
    sparsity: Sparsity
    size_bytes: Sizes
    latency: list[LatencyRecord]
    pruned: bool = False  # a stage left pruning masks on the student
    quantize_mode: str | None = None  # 'qat' | 'ptq' when a stage quantized the student
    prune_criterion: str | None = None  # when a stage pruned with the prune section's options
    image_shape: list[int] | None = None
    quantization: Quantization | None = None
    faithfulness: dict[str, Any] | None = None
    stage_records: list[StageRecord] = field(default_factory=list)
    degradation: dict[str, Any] | None = None  # pqd.measure.degradation.compare_degradation (teacher vs deployed)
    speedup: dict[str, Any] | None = None  # pqd.measure.speedup.speedup_summary of ``latency``
    # the threading environment ``latency`` was timed in: pqd.measure.workers.WorkerEnvironment.record
    # ({"inherited", "variables", "ignored_from_caller", "policy"}) and "harness"; None before schema 4
    latency_env: dict[str, Any] | None = None
    wall_time_s: float | None = None
    schema: int = SCHEMA
    extra: dict[str, Any] = field(default_factory=dict)  # keys written by other commands (e.g. 'bench')

    @property
    def dense(self) -> bool:
        return not self.stage_order

    @property
    def stage_label(self) -> str:
        """'P>Q>D' (stage letters in order); 'dense' for a run without stages."""
        if self.stage_records:
            return ">".join(r.letter for r in self.stage_records)
        return ">".join(s.split(":")[0] for s in self.stages.split(",") if s) or "dense"

    @property
    def final_model_name(self) -> str:
        """The latency records' name of the final model: 'final_int8' or 'final_fp32'."""
        return f"final_{self.final_form}"

    def median_ms(self, model: str, batch: int) -> float | None:
        return next((r.median_ms for r in self.latency if r.model == model and r.batch == batch), None)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"schema": self.schema}
        for f in dataclasses.fields(self):
            if f.name in ("schema", "extra"):
                continue
            v = getattr(self, f.name)
            if isinstance(v, list):
                v = [x.to_dict() if hasattr(x, "to_dict") else x for x in v]
            elif hasattr(v, "to_dict"):
                v = v.to_dict()
            out[f.name] = v
        return out | {k: v for k, v in self.extra.items() if k not in out}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Metrics:
        """Read a metrics.json of this schema; older schemas (pre-release pqd) are refused."""
        if d.get("schema") not in READABLE:
            raise CheckpointError(
                f"metrics.json has schema {d.get('schema')!r}, and this pqd reads schemas "
                f"{', '.join(map(str, READABLE))} (an older run folder); run the same config again with "
                "`pqd run CONFIG --out RUN_DIR` to measure it anew"
            )
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        order = list(d.get("stage_order") or [])
        acc = d.get("accuracy") or {}
        return cls(
            model=d["model"],
            width=d.get("width", 1.0),
            dataset=d["dataset"],
            num_classes=d.get("num_classes", 0),
            stages=d.get("stages", ""),
            stage_order=order,
            epochs=dict(d.get("epochs") or {}),
            teacher_source=d.get("teacher_source", "trained"),
            final_form=d.get("final_form", "fp32"),
            accuracy=Accuracy.from_dict(acc),
            sparsity=Sparsity.from_dict(d.get("sparsity") or {"target": 0.0, "achieved": 0.0}),
            size_bytes=Sizes.from_dict(d["size_bytes"]),
            latency=[LatencyRecord.from_dict(r) for r in d.get("latency") or []],
            pruned=d.get("pruned", False),
            quantize_mode=d.get("quantize_mode"),
            prune_criterion=d.get("prune_criterion"),
            image_shape=d.get("image_shape"),
            quantization=Quantization.from_dict(d["quantization"]) if d.get("quantization") else None,
            faithfulness=d.get("faithfulness"),
            stage_records=[StageRecord.from_dict(r) for r in d.get("stage_records") or []],
            degradation=d.get("degradation"),
            speedup=d.get("speedup"),
            latency_env=d.get("latency_env"),
            wall_time_s=d.get("wall_time_s"),
            schema=d["schema"],
            extra={k: v for k, v in d.items() if k not in names},
        )
