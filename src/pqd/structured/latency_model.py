"""INT8 latency of channel widths, measured on the deployment runtime and fitted.

What is measured: a candidate model (a pruned copy of the dense model) is quantized the
way pqd deploys it (FX static INT8: per-channel symmetric weights, BN folded; calibrated
on random inputs, which changes scales but not the work done), exported to the target
runtime's form (ONNX QDQ for OpenVINO and ONNX Runtime, a frozen TorchScript INT8 module
for PyTorch), and timed in a worker process of its own with pqd's interleaved block
harness (:func:`pqd.measure.latency.interleave`), at the target's batch and threads.

What is predicted: a linear model, fitted by non-negative least squares, of whole-model
latency on features of the per-layer shapes the widths imply
(:meth:`pqd.structured.graph.ChannelGraph.layer_shapes`): a constant; MACs of dense convs
at high and at low spatial resolution, of pointwise, depthwise and linear layers, each
with channel counts padded up to the kernels' channel block (``pad``); and output
activation elements (memory traffic, element-wise ops, re-quantization). Why a fitted
whole-model model and not a per-block lookup table: a conv's cost depends on both its
input and its output width, which belong to different groups, so per-group deltas are not
additive; whole-model samples also include the runtime's fusions and layout reorders.
The fit's error is reported by leave-one-out over the samples, and every
hardware-in-the-loop measurement of the search joins the samples.

Every run that measures samples also times the dense model beside them, and each sample keeps
that same-run dense reading (``dense_ms``). When every sample has one, the model is fitted to
latency *relative to the dense model of its own run* and predicts that ratio times the median
dense reading: the machine's speed drifts between runs (the same dense model reads several
percent apart from one run to the next), and a ratio measured side by side does not carry that
drift into the fit. Samples cached before this was recorded have no ``dense_ms``; a model with
any such sample is fitted in milliseconds, as before.

Samples are cached as JSON under ``<pqd cache>/structured_latency/`` keyed by CPU model,
runtime and its version, torch version, threads, batch, input shape and the dense model's
layer table, so a model is measured once per machine and target.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from pqd.errors import ConfigError, ModelError

log = logging.getLogger("pqd.structured")

RUNTIMES = ("openvino", "onnxruntime", "pytorch")
FEATURES = ("const", "conv_macs_hi", "conv_macs_lo", "pointwise_macs", "depthwise_macs", "linear_macs", "activations")
HI_RES = 256  # output positions (16x16) from which a conv counts as high resolution
CACHE_SCHEMA = 1


@dataclass(frozen=True)
class Target:
    """Where the model is deployed: runtime, batch size, threads."""

    runtime: str = "openvino"
    batch: int = 1
    threads: int = 2

    def __post_init__(self):
        if self.runtime not in RUNTIMES:
            raise ConfigError(f"structured.runtime: {self.runtime!r} is not valid; choose one of {', '.join(map(repr, RUNTIMES))}")
        if self.batch < 1 or self.threads < 1:
            raise ConfigError(f"structured: batch ({self.batch}) and threads ({self.threads}) must be >= 1")


# --------------------------------------------------------------------------- measuring


def export_int8(model: nn.Module, example: torch.Tensor, runtime: str, path: Path) -> dict:
    """Quantize ``model`` (static INT8, random calibration) and write what ``runtime`` runs; returns a worker spec part."""
    from pqd.stages.common import Student
    from pqd.stages.quantize import convert, prepare, to_torchscript

    prepared = prepare(model.cpu().eval(), example, mode="ptq")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(2):
            prepared(torch.randn(8, *example.shape[1:], generator=gen))
    student = Student(prepared, {}, "ptq")
    if runtime == "pytorch":
        ts = to_torchscript(convert(student), example[:1])
        p = path.with_suffix(".pt")
        torch.jit.save(ts, str(p))
        return {"kind": "torchscript", "path": str(p)}
    from pqd.export import export_onnx, reference_int8

    p = path.with_suffix(".onnx")
    export_onnx(reference_int8(student), p, tuple(example.shape[1:]))
    return {"kind": runtime, "path": str(p)}


def measure_int8(
    models: Mapping[str, nn.Module],
    *,
    target: Target,
    input_shape: Sequence[int],
    runs: int = 100,
    warmup: int = 10,
    workdir: str | Path | None = None,
    in_process: bool = False,
) -> dict[str, float]:
    """Median INT8 latency (ms) of each model on ``target``, timed interleaved in worker processes.

    ``in_process=True`` (PyTorch runtime only) times the TorchScript INT8 modules in this
    process instead: no worker start-up, for quick checks and tests.
    """
    from pqd.measure.latency import interleave

    example = torch.zeros(2, *input_shape)
    if in_process:
        if target.runtime != "pytorch":
            raise ConfigError(f"in-process timing is for the PyTorch runtime only, not {target.runtime!r}")
        from pqd.measure.latency import measure_latency

        fns = {}
        with tempfile.TemporaryDirectory(prefix="pqd_lat_", dir=workdir) as tmp:
            for i, (name, m) in enumerate(models.items()):
                fns[name] = torch.jit.load(export_int8(m, example, "pytorch", Path(tmp) / f"m{i}")["path"])
        recs = measure_latency(fns, input_shape=tuple(input_shape), batch_sizes=(target.batch,), threads=target.threads,
                               warmup=warmup, runs=runs, large_batch_runs=max(3, runs // 5))
        return {r["model"]: r["median_ms"] for r in recs}
    from pqd.measure.workers import start_workers

    with tempfile.TemporaryDirectory(prefix="pqd_lat_", dir=workdir) as tmp:
        specs = {}
        for i, (name, m) in enumerate(models.items()):
            part = export_int8(m, example, target.runtime, Path(tmp) / f"m{i}")
            specs[name] = part | {"threads": target.threads, "input_shape": list(input_shape), "batch_sizes": [target.batch], "seed": 0}
        with start_workers(specs) as workers:
            recs = interleave(workers, batch_sizes=(target.batch,), threads=target.threads, warmup=warmup, runs=runs,
                              large_batch_runs=max(3, runs // 5))
    return {r["model"]: r["median_ms"] for r in recs}


# --------------------------------------------------------------------------- features and fit


def _pad(c: int, pad: int) -> int:
    return -(-c // pad) * pad


def features(layers, *, pad: int = 16) -> np.ndarray:
    """The latency model's features of one model's layer shapes (``FEATURES`` order; MACs in millions)."""
    f = np.zeros(len(FEATURES))
    f[0] = 1.0
    for r in layers:
        cin, cout = _pad(r.cin, pad), _pad(r.cout, pad)
        if r.kind == "depthwise":
            macs = r.out_hw * cout * r.kernel
            f[4] += macs
        elif r.kind == "linear":
            f[5] += r.out_hw * cout * cin
        else:
            macs = r.out_hw * cout * (cin // r.groups) * r.kernel
            if r.kind == "pointwise":
                f[3] += macs
            else:
                f[1 if r.out_hw >= HI_RES else 2] += macs
        f[6] += r.out_hw * cout
    f[1:] /= 1e6
    return f


def _nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from scipy.optimize import nnls

    scale = np.maximum(np.abs(a).max(0), 1e-12)
    coef, _ = nnls(a / scale, b)
    return coef / scale


@dataclass
class LatencyModel:
    """Measured samples (widths -> ms) of one dense model on one target, and the fit over them."""

    key: dict
    # {"widths": {gid: k}, "ms": float, "source": str, "dense_ms": the dense model's ms in the same run (when recorded)}
    samples: list[dict] = field(default_factory=list)
    pad: int = 16
    coef: np.ndarray | None = None
    scale: float = 1.0  # ms per unit of the fitted quantity: the median dense reading when relative, else 1

    @property
    def relative(self) -> bool:
        """Fitted to latency relative to the same run's dense reading (every sample has one)."""
        return bool(self.samples) and all(s.get("dense_ms") for s in self.samples)

    def _x(self, graph, widths) -> np.ndarray:
        return features(graph.layer_shapes(widths), pad=self.pad)

    def _y(self, s: dict) -> float:
        return s["ms"] / s["dense_ms"] if self.relative else s["ms"]

    def fit(self, graph) -> "LatencyModel":
        if len(self.samples) < 2:
            raise ModelError("the latency model needs at least 2 measured samples")
        a = np.stack([self._x(graph, s["widths"]) for s in self.samples])
        b = np.array([self._y(s) for s in self.samples])
        w = 1.0 / b  # relative error matters: weight each sample by 1/latency
        self.coef = _nnls(a * w[:, None], b * w)
        self.scale = self.dense_ms(graph) if self.relative else 1.0
        return self

    def dense_ms(self, graph) -> float | None:
        """The median of the dense model's measured readings (one per run), or None before the first."""
        chans = graph.widths()
        readings = [s["ms"] for s in self.samples if s["widths"] == chans]
        if not readings and self.relative:
            readings = [s["dense_ms"] for s in self.samples]
        return float(np.median(readings)) if readings else None

    def predict(self, graph, widths: Mapping[str, int]) -> float:
        if self.coef is None:
            self.fit(graph)
        return float(self._x(graph, widths) @ self.coef) * self.scale

    def loo_errors(self, graph) -> list[float]:
        """Leave-one-out relative prediction errors (predicted / measured - 1) over the samples."""
        errs = []
        for i in range(len(self.samples)):
            rest = LatencyModel(self.key, self.samples[:i] + self.samples[i + 1:], self.pad)
            if len(rest.samples) < 2:
                break
            rest.fit(graph)
            s = self.samples[i]
            pred = rest.predict(graph, s["widths"])
            if rest.relative:  # anchored to the dense model of the sample's own run, as the search checks a fraction
                pred = pred / rest.scale * s["dense_ms"]
            errs.append(pred / s["ms"] - 1)
        return errs

    def add(self, widths: Mapping[str, int], ms: float, source: str, *, dense_ms: float | None = None) -> None:
        """One measurement; ``dense_ms``: the dense model timed in the same run (side by side)."""
        sample = {"widths": dict(widths), "ms": float(ms), "source": source}
        if dense_ms is not None:
            sample["dense_ms"] = float(dense_ms)
        self.samples.append(sample)
        self.coef = None

    def to_dict(self) -> dict:
        return {"schema": CACHE_SCHEMA, "key": self.key, "pad": self.pad, "samples": self.samples, "relative": self.relative,
                "features": list(FEATURES), "coef": None if self.coef is None else self.coef.tolist()}


def cache_key(graph, target: Target, input_shape: Sequence[int]) -> dict:
    from pqd.measure.env import environment

    env = environment(target.threads)
    rt_version = torch.__version__
    if target.runtime == "openvino":
        import openvino

        rt_version = openvino.get_version()
    elif target.runtime == "onnxruntime":
        import onnxruntime

        rt_version = onnxruntime.__version__
    layers = [(r.name, r.kind, r.cin, r.cout, r.groups, r.kernel, r.out_hw) for r in graph.layers]
    arch = hashlib.sha256(json.dumps([list(input_shape), layers]).encode()).hexdigest()[:16]
    return {"cpu_model": env["cpu_model"], "runtime": target.runtime, "runtime_version": rt_version, "torch": torch.__version__,
            "threads": target.threads, "batch": target.batch, "input_shape": list(input_shape), "architecture": arch}


def cache_path(key: dict, cache_dir: str | Path | None = None) -> Path:
    from pqd.data.cache import cache_root

    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_root(None if cache_dir is None else str(cache_dir)) / "structured_latency" / f"{key['runtime']}_{h}.json"


def save(model: LatencyModel, cache_dir: str | Path | None = None) -> Path:
    p = cache_path(model.key, cache_dir)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(model.to_dict(), indent=1))
        os.replace(tmp, p)
    except OSError as exc:
        log.warning("could not write the latency cache %s (%s)", p, exc)
    return p


def load(key: dict, cache_dir: str | Path | None = None) -> LatencyModel | None:
    p = cache_path(key, cache_dir)
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    if d.get("schema") != CACHE_SCHEMA or d.get("key") != key:
        return None
    return LatencyModel(key, d["samples"], d.get("pad", 16))


def sample_widths(graph, n: int, *, round_to: int = 8, min_keep: float = 0.25, seed: int = 0) -> list[dict[str, int]]:
    """Width configurations to measure: dense, uniform scalings, and random per-group ratios."""
    from pqd.structured.graph import round_width

    rng = random.Random(seed)
    chans = graph.widths()
    out = [dict(chans)]
    uniform = [0.75, 0.5, min_keep]
    for r in uniform:
        if len(out) < n:
            out.append({g: round_width(c * r, c, round_to) for g, c in chans.items()})
    while len(out) < n:
        out.append({g: round_width(c * rng.uniform(min_keep, 1.0), c, round_to) for g, c in chans.items()})
    return out


def build(
    model: nn.Module,
    graph,
    *,
    target: Target,
    input_shape: Sequence[int],
    samples: int = 12,
    runs: int = 100,
    round_to: int = 8,
    min_keep: float = 0.25,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    seed: int = 0,
    in_process: bool = False,
) -> LatencyModel:
    """The fitted latency model of ``model``'s widths on ``target``: cached samples, else measured now."""
    from pqd.structured.graph import prune_to_widths

    key = cache_key(graph, target, input_shape)
    lm = load(key, cache_dir) if use_cache else None
    if lm is not None and len(lm.samples) >= samples:
        log.info("latency model: %d cached samples from %s", len(lm.samples), cache_path(key, cache_dir))
        return lm.fit(graph)
    lm = lm or LatencyModel(key)
    example = torch.zeros(2, *input_shape)
    chans = graph.widths()
    todo = sample_widths(graph, samples, round_to=round_to, min_keep=min_keep, seed=seed + len(lm.samples))[len(lm.samples):]
    models = {f"s{i}": prune_to_widths(model, w, example=example, round_to=1) for i, w in enumerate(todo)}
    if chans not in todo:  # every run times the dense model beside its samples
        models["dense"] = model
    ms = measure_int8(models, target=target, input_shape=input_shape, runs=runs, in_process=in_process)
    run_dense = ms["dense"] if "dense" in ms else ms[f"s{todo.index(chans)}"]
    for i, w in enumerate(todo):
        lm.add(w, ms[f"s{i}"], "calibration", dense_ms=run_dense)
    if "dense" in ms:
        lm.add(chans, run_dense, "calibration_dense", dense_ms=run_dense)
    lm.fit(graph)
    if use_cache:
        save(lm, cache_dir)
    return lm


def report(lm: LatencyModel, graph) -> dict:
    """JSON-able summary: samples, coefficients, leave-one-out error."""
    errs = lm.loo_errors(graph)
    return {"key": lm.key, "samples": len(lm.samples), "features": list(FEATURES),
            "coef": [float(c) for c in (lm.coef if lm.coef is not None else lm.fit(graph).coef)],
            "loo_abs_error_mean": float(np.mean(np.abs(errs))) if errs else None,
            "loo_abs_error_max": float(np.max(np.abs(errs))) if errs else None,
            "relative": lm.relative, "dense_ms_median": lm.scale if lm.relative else None,
            "target": asdict(Target(lm.key["runtime"], lm.key["batch"], lm.key["threads"]))}
