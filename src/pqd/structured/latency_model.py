"""INT8 latency of channel widths, measured on the deployment runtime and fitted.

What is measured: a candidate model (a pruned copy of the dense model) is quantized the
way pqd deploys it (FX static INT8: per-channel symmetric weights, BN folded; calibrated
on random inputs, which changes scales but not the work done), exported to the target
runtime's form (ONNX QDQ for OpenVINO and ONNX Runtime, a frozen TorchScript INT8 module
for PyTorch), and timed in a worker process of its own with pqd's interleaved block
harness (:func:`pqd.measure.latency.interleave`), at the target's batch and threads.

What is predicted: a linear model, fitted by non-negative least squares, of whole-model
latency on features of the per-layer shapes the widths imply
(:meth:`pqd.compress.channels.graph.ChannelGraph.layer_shapes`): a constant; MACs of dense convs
at high and at low spatial resolution, of pointwise, depthwise and linear layers, each
with channel counts padded up to the kernels' channel block (``pad``); and output
activation elements (memory traffic, element-wise ops, re-quantization). Why a fitted
whole-model model and not a per-block lookup table: a conv's cost depends on both its
input and its output width, which belong to different groups, so per-group deltas are not
additive; whole-model samples also include the runtime's fusions and layout reorders.
The fit's error is reported by leave-one-out over the samples, and every
hardware-in-the-loop measurement of the search joins the samples.

Every run that measures samples also times two reference models beside them: the dense model,
and the *floor* model (every group at its rounding minimum: the same layers with almost no work).
Each sample keeps both same-run readings (``dense_ms``, ``floor_ms``), and the model is fitted to
``(ms - floor) / (dense - floor)`` of the sample's own run; a prediction is that fraction times
(median dense - median floor) plus the median floor reading, or, against a given run, times that
run's readings. Measured reason (benchmarks/latency_states.py): the project's machine reads in two
states that last seconds to minutes; in the slow one every call pays a roughly fixed extra time
per layer, which a ratio to dense alone turns into a larger ratio for a small model, and the dense
model's own reading wanders several percent from run to run. The floor model carries the first, the
dense model the second. Samples with a dense reading only (cached before the floor was timed) are
fitted relative to dense; samples with neither, in milliseconds.

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
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pqd.compress.channels.graph import MIN_KEEP, ROUND_TO
from pqd.compress.qat import convert, prepare, to_torchscript
from pqd.compress.qoptions import QuantOptions
from pqd.compress.student import Student
from pqd.deploy.onnx import export_onnx, reference_int8
from pqd.errors import ConfigError, ModelError, RuntimeCrash
from pqd.measure.workers import runtime_name
from pqd.safety.isolate import run_isolated

log = logging.getLogger("pqd.structured")

RUNTIMES = ("openvino", "onnxruntime", "pytorch")
FEATURES = ("const", "conv_macs_hi", "conv_macs_lo", "pointwise_macs", "depthwise_macs", "linear_macs", "activations")
HI_RES = 256  # output positions (16x16) from which a conv counts as high resolution
CACHE_SCHEMA = 1


@dataclass(frozen=True)
class Target:
    """Where the model is deployed: runtime, batch size, threads, and how it is quantized
    (the run's ``quantize`` settings: activation range, weight options, FP32 leaf modules)."""

    runtime: str = "openvino"
    batch: int = 1
    threads: int = 2
    reduce_range: bool = False
    options: QuantOptions = QuantOptions()
    leaf_modules: tuple[str, ...] = ()

    @property
    def quantization(self) -> dict:
        """The non-default quantize settings (empty for pqd's defaults), for cache keys and records."""
        out: dict[str, Any] = {}
        if self.reduce_range:
            out["reduce_range"] = True
        if not self.options.default:
            out["weights"] = self.options.label()
        if self.leaf_modules:
            out["leaf_modules"] = list(self.leaf_modules)
        return out

    def __post_init__(self):
        if self.runtime not in RUNTIMES:
            raise ConfigError(
                f"structured.runtime: {self.runtime!r} is not valid; choose one of {', '.join(map(repr, RUNTIMES))}"
            )
        if self.batch < 1 or self.threads < 1:
            raise ConfigError(f"structured: batch ({self.batch}) and threads ({self.threads}) must be >= 1")


# --------------------------------------------------------------------------- measuring


def export_int8(
    model: nn.Module, example: torch.Tensor, runtime: str, path: Path, *, target: Target | None = None
) -> dict:
    """Quantize ``model`` (static INT8, random calibration, with ``target``'s quantize settings) and
    write what ``runtime`` runs; returns a worker spec part."""
    target = target or Target(runtime)
    prepared = prepare(
        model.cpu().eval(),
        example,
        mode="ptq",
        reduce_range=target.reduce_range,
        options=target.options,
        leaf_modules=target.leaf_modules,
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(2):
            prepared(torch.randn(8, *example.shape[1:], generator=gen))
    student = Student(prepared, {}, "ptq")
    if runtime == "pytorch":
        ts = to_torchscript(convert(prepared), example[:1])
        p = path.with_suffix(".pt")
        torch.jit.save(ts, str(p))
        return {"kind": "torchscript", "path": str(p)}
    p = path.with_suffix(".onnx")
    export_onnx(reference_int8(student), p, tuple(example.shape[1:]))
    return {"kind": runtime, "path": str(p)}


RUNTIME_PROBE = "pqd.measure.worker:probe"  # loads a worker spec's model and runs it once
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def failing_operation(message: str) -> str:
    """The line of a runtime's error that names what failed (OpenVINO's '[Transformation] ...'
    line when there is one), without colour codes, for a one-line message."""
    head = _ANSI.sub("", message.split("\n--- ")[0])
    lines = [ln.strip() for ln in head.splitlines() if ln.strip()]
    named = [ln for ln in lines if re.search(r"\[[A-Za-z][\w:]*\]", ln)]
    return ((named or lines or ["no message"])[0])[:300]


def check_runtime(model: nn.Module, *, target: Target, input_shape: Sequence[int], timeout: float = 600.0) -> dict:
    """Export ``model``'s INT8 form for ``target.runtime`` and load and run it once in a process of
    its own, so that the S stage learns before any training whether it can time candidates there.

    Returns ``{"batch_shape": "static" | "dynamic"}`` (OpenVINO: a static-batch compile that
    crashes natively is retried with a dynamic batch, as the timing workers then do); ``{}`` for
    PyTorch. Raises :class:`ModelError` naming the runtime, the failing operation and the
    alternative runtimes when the runtime cannot take the model at all.
    """
    if target.runtime == "pytorch":
        return {}
    name = runtime_name(target.runtime)
    with tempfile.TemporaryDirectory(prefix="pqd_rtcheck_") as tmp:
        part = export_int8(model, torch.zeros(2, *input_shape), target.runtime, Path(tmp) / "dense", target=target)
        spec = part | {
            "threads": target.threads,
            "input_shape": list(input_shape),
            "batch_sizes": [target.batch],
            "seed": 0,
        }
        shapes = ("static", "dynamic") if target.runtime == "openvino" else ("static",)
        failure = None
        for shape in shapes:
            try:
                run_isolated(
                    RUNTIME_PROBE,
                    {"spec": spec | {"dynamic_batch": shape == "dynamic"}},
                    timeout=timeout,
                    runtime=target.runtime,
                    model=type(model).__name__,
                )
            except RuntimeCrash as exc:
                if failure is None:
                    failure = exc
                if not exc.signal:  # an error, not a crash: another batch shape will not help
                    break
                continue
            if failure is not None:  # the static batch crashed, the dynamic one runs
                log.warning(
                    "structured: %s crashed (%s) compiling this model's INT8 form at a static batch; its candidates are "
                    "timed with a dynamic batch",
                    name,
                    failure.signal,
                )
            return {"batch_shape": shape}
    assert failure is not None  # the loop returns as soon as a batch shape runs
    how = (
        f"it crashed with {failure.signal}"
        if failure.signal
        else failing_operation(str(failure).split(" failed: ", 1)[-1])
    )
    raise ModelError(
        f"structured.runtime: {target.runtime}: {name} cannot run this model's INT8 form ({how}). The S stage times every "
        f"candidate on that runtime, so the run stops here, before training. Set structured.runtime: onnxruntime "
        f"(or pytorch) to measure latency on a runtime that takes this model"
    )


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

    The workers always start in the controlled threading environment
    (:func:`pqd.measure.workers.worker_environment`), never the caller's: the samples are cached
    for every later run on this machine, so they must not depend on one run's shell.

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
                fns[name] = torch.jit.load(
                    export_int8(m, example, "pytorch", Path(tmp) / f"m{i}", target=target)["path"]
                )
        recs = measure_latency(
            fns,
            input_shape=tuple(input_shape),
            batch_sizes=(target.batch,),
            threads=target.threads,
            warmup=warmup,
            runs=runs,
            large_batch_runs=max(3, runs // 5),
        )
        return {r["model"]: r["median_ms"] for r in recs}
    from pqd.measure.workers import start_workers

    with tempfile.TemporaryDirectory(prefix="pqd_lat_", dir=workdir) as tmp:
        specs = {}
        for i, (name, m) in enumerate(models.items()):
            part = export_int8(m, example, target.runtime, Path(tmp) / f"m{i}", target=target)
            specs[name] = part | {
                "threads": target.threads,
                "input_shape": list(input_shape),
                "batch_sizes": [target.batch],
                "seed": 0,
            }
        with start_workers(specs) as workers:
            recs = interleave(
                workers,
                batch_sizes=(target.batch,),
                threads=target.threads,
                warmup=warmup,
                runs=runs,
                large_batch_runs=max(3, runs // 5),
            )
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


def floor_widths(graph, round_to: int = ROUND_TO) -> dict[str, int]:
    """The floor model's widths: every group at ``min(round_to, channels)``."""
    return {g: min(round_to, c) for g, c in graph.widths().items()}


@dataclass
class LatencyModel:
    """Measured samples (widths -> ms) of one dense model on one target, and the fit over them."""

    key: dict
    # {"widths": {gid: k}, "ms": float, "source": str, and when recorded, the same run's readings of the
    #  dense model ("dense_ms") and of the floor model ("floor_ms")}
    samples: list[dict] = field(default_factory=list)
    pad: int = 16
    coef: np.ndarray | None = None
    scale: float = 1.0  # ms per unit of the fitted quantity: median dense (- median floor when anchored), else 1
    offset: float = 0.0  # ms added to every prediction: the median floor reading when anchored, else 0
    _x_floor: np.ndarray | None = field(default=None, repr=False)

    @property
    def fit_kind(self) -> str:
        """``anchored`` (every sample has same-run dense and floor readings), ``relative`` (dense only) or ``ms``."""
        if not self.samples or not all(s.get("dense_ms") for s in self.samples):
            return "ms"
        if (
            all(s.get("floor_ms") is not None and s["dense_ms"] > s["floor_ms"] for s in self.samples)
            and len({s.get("floor_round_to", 8) for s in self.samples}) == 1
        ):
            return "anchored"
        return "relative"

    @property
    def relative(self) -> bool:
        """Fitted to latency relative to the same run's reference readings (dense, and floor when anchored)."""
        return self.fit_kind != "ms"

    def _x(self, graph, widths) -> np.ndarray:
        x = features(graph.layer_shapes(widths), pad=self.pad)
        # anchored: the features of the work above the floor model's (the constant cancels); set by fit()
        return x if self._x_floor is None else x - self._x_floor

    def _floor(self, graph) -> dict[str, int]:
        """The floor model's widths (rounding minimum ``round_to`` of the samples, recorded in each)."""
        return floor_widths(graph, int(self.samples[0].get("floor_round_to", 8)))

    def _refs(self, s: dict) -> tuple[float, float]:
        """(offset, scale) in ms of the run sample ``s`` came from."""
        kind = self.fit_kind
        if kind == "anchored":
            return s["floor_ms"], s["dense_ms"] - s["floor_ms"]
        return (0.0, s["dense_ms"]) if kind == "relative" else (0.0, 1.0)

    def fit(self, graph) -> LatencyModel:
        if len(self.samples) < 2:
            raise ModelError("the latency model needs at least 2 measured samples")
        self._x_floor = None
        if self.fit_kind == "anchored":
            self._x_floor = features(graph.layer_shapes(self._floor(graph)), pad=self.pad)
        a = np.stack([self._x(graph, s["widths"]) for s in self.samples])
        refs = np.array([self._refs(s) for s in self.samples])
        ms = np.array([s["ms"] for s in self.samples])
        b = (ms - refs[:, 0]) / refs[:, 1]
        w = refs[:, 1] / ms  # relative error in ms matters: weight each sample by d(ms)/d(fit) / ms
        self.coef = _nnls(a * w[:, None], b * w)
        kind = self.fit_kind
        if kind == "ms":
            self.scale, self.offset = 1.0, 0.0
        else:
            dense = self.dense_ms(graph)
            assert dense is not None  # relative: every sample holds its run's dense reading
            self.offset = float(np.median([s["floor_ms"] for s in self.samples])) if kind == "anchored" else 0.0
            self.scale = dense - self.offset
        return self

    def dense_ms(self, graph) -> float | None:
        """The median of the dense model's measured readings (one per run), or None before the first."""
        chans = graph.widths()
        readings = [s["ms"] for s in self.samples if s["widths"] == chans]
        if not readings and self.relative:
            readings = [s["dense_ms"] for s in self.samples]
        return float(np.median(readings)) if readings else None

    def predict(self, graph, widths: Mapping[str, int]) -> float:
        """Predicted ms at the median reference readings (a typical run)."""
        if self.coef is None:
            self.fit(graph)
        return float(self._x(graph, widths) @ self.coef) * self.scale + self.offset

    def predict_in_run(
        self, graph, widths: Mapping[str, int], *, dense_ms: float, floor_ms: float | None = None
    ) -> float:
        """Predicted ms in a run whose dense (and floor) models read ``dense_ms`` (``floor_ms``): what a
        measurement in that run is compared with. A model fitted in ms ignores the readings."""
        if self.coef is None:
            self.fit(graph)
        y = float(self._x(graph, widths) @ self.coef)
        kind = self.fit_kind
        if kind == "anchored" and floor_ms is not None:
            return floor_ms + y * (dense_ms - floor_ms)
        if kind == "anchored":  # no floor reading in that run: the predicted ratio to dense, times its dense reading
            return (y * self.scale + self.offset) / (self.scale + self.offset) * dense_ms
        return y * dense_ms if kind == "relative" else y

    def loo_errors(self, graph) -> list[float]:
        """Leave-one-out relative prediction errors (predicted / measured - 1) over the samples, each
        predicted in its own run's reference readings (as the search compares a measurement)."""
        errs = []
        for i in range(len(self.samples)):
            rest = LatencyModel(self.key, self.samples[:i] + self.samples[i + 1 :], self.pad)
            if len(rest.samples) < 2:
                break
            rest.fit(graph)
            s = self.samples[i]
            pred = rest.predict_in_run(
                graph, s["widths"], dense_ms=s.get("dense_ms") or 0.0, floor_ms=s.get("floor_ms")
            )
            errs.append(pred / s["ms"] - 1)
        return errs

    def add(
        self,
        widths: Mapping[str, int],
        ms: float,
        source: str,
        *,
        dense_ms: float | None = None,
        floor_ms: float | None = None,
        floor_round_to: int = ROUND_TO,
    ) -> None:
        """One measurement; ``dense_ms`` / ``floor_ms``: the dense and floor models (``floor_widths(graph,
        floor_round_to)``) timed in the same run."""
        sample = {"widths": dict(widths), "ms": float(ms), "source": source}
        self._x_floor = None
        if dense_ms is not None:
            sample["dense_ms"] = float(dense_ms)
        if floor_ms is not None:
            sample["floor_ms"], sample["floor_round_to"] = float(floor_ms), int(floor_round_to)
        self.samples.append(sample)
        self.coef = None

    def to_dict(self) -> dict:
        return {
            "schema": CACHE_SCHEMA,
            "key": self.key,
            "pad": self.pad,
            "samples": self.samples,
            "fit": self.fit_kind,
            "features": list(FEATURES),
            "coef": None if self.coef is None else self.coef.tolist(),
        }


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
    key = {
        "cpu_model": env["cpu_model"],
        "runtime": target.runtime,
        "runtime_version": rt_version,
        "torch": torch.__version__,
        "threads": target.threads,
        "batch": target.batch,
        "input_shape": list(input_shape),
        "architecture": arch,
    }
    if target.quantization:  # only non-default settings: the keys of caches made with the defaults stay valid
        key["quantization"] = target.quantization
    return key


def cache_path(key: dict, cache_dir: str | Path | None = None) -> Path:
    from pqd.data.cache import cache_root

    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return (
        cache_root(None if cache_dir is None else str(cache_dir)) / "structured_latency" / f"{key['runtime']}_{h}.json"
    )


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


def sample_widths(
    graph, n: int, *, round_to: int = ROUND_TO, min_keep: float = MIN_KEEP, seed: int = 0
) -> list[dict[str, int]]:
    """Width configurations to measure: dense, uniform scalings, and random per-group ratios."""
    from pqd.compress.channels.graph import round_width

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


def reference_models(
    model: nn.Module, graph, *, example: torch.Tensor, round_to: int = ROUND_TO, skip=()
) -> dict[str, nn.Module]:
    """``{"dense": model, "floor": the floor model}`` to time beside samples, less widths already in ``skip``
    (and no floor when it is the dense model itself: a model whose groups are all at most ``round_to`` wide)."""
    from pqd.compress.channels.graph import prune_to_widths

    chans, floor = graph.widths(), floor_widths(graph, round_to)
    out = {} if chans in skip else {"dense": model}
    if floor != chans and floor not in skip:
        out["floor"] = prune_to_widths(model, floor, example=example, round_to=1)
    return out


def reference_readings(
    ms: Mapping[str, float], todo: Sequence[Mapping[str, int]], chans: Mapping[str, int], floor: Mapping[str, int]
) -> tuple[float, float | None]:
    """(dense ms, floor ms or None) of one run from its readings: the reference models', or a sample with their widths."""

    def reading(name: str, widths) -> float | None:
        if name in ms:
            return ms[name]
        return ms[f"s{list(todo).index(widths)}"] if widths in todo else None

    dense = reading("dense", chans)
    assert dense is not None  # reference_models times the dense model unless a sample has its widths
    return dense, (None if floor == chans else reading("floor", floor))


def build(
    model: nn.Module,
    graph,
    *,
    target: Target,
    input_shape: Sequence[int],
    samples: int = 12,
    runs: int = 100,
    round_to: int = ROUND_TO,
    min_keep: float = MIN_KEEP,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    seed: int = 0,
    in_process: bool = False,
) -> LatencyModel:
    """The fitted latency model of ``model``'s widths on ``target``: cached samples, else measured now."""
    from pqd.compress.channels.graph import prune_to_widths

    key = cache_key(graph, target, input_shape)
    lm = load(key, cache_dir) if use_cache else None
    if lm is not None and len(lm.samples) >= samples:
        log.info("latency model: %d cached samples from %s", len(lm.samples), cache_path(key, cache_dir))
        return lm.fit(graph)
    lm = lm or LatencyModel(key)
    example = torch.zeros(2, *input_shape)
    chans = graph.widths()
    todo = sample_widths(graph, samples, round_to=round_to, min_keep=min_keep, seed=seed + len(lm.samples))[
        len(lm.samples) :
    ]
    models = {f"s{i}": prune_to_widths(model, w, example=example, round_to=1) for i, w in enumerate(todo)}
    models |= reference_models(model, graph, example=example, round_to=round_to, skip=todo)
    ms = measure_int8(models, target=target, input_shape=input_shape, runs=runs, in_process=in_process)
    run_dense, run_floor = reference_readings(ms, todo, chans, floor_widths(graph, round_to))
    for i, w in enumerate(todo):
        lm.add(w, ms[f"s{i}"], "calibration", dense_ms=run_dense, floor_ms=run_floor, floor_round_to=round_to)
    if "dense" in ms:
        lm.add(chans, run_dense, "calibration_dense", dense_ms=run_dense, floor_ms=run_floor, floor_round_to=round_to)
    lm.fit(graph)
    if use_cache:
        save(lm, cache_dir)
    return lm


def report(lm: LatencyModel, graph) -> dict:
    """JSON-able summary: samples, coefficients, leave-one-out error."""
    errs = lm.loo_errors(graph)
    coef = lm.coef if lm.coef is not None else lm.fit(graph).coef
    assert coef is not None  # fit() sets it
    return {
        "key": lm.key,
        "samples": len(lm.samples),
        "features": list(FEATURES),
        "coef": [float(c) for c in coef],
        "loo_abs_error_mean": float(np.mean(np.abs(errs))) if errs else None,
        "loo_abs_error_max": float(np.max(np.abs(errs))) if errs else None,
        "fit": lm.fit_kind,
        "relative": lm.relative,
        "dense_ms_median": lm.dense_ms(graph) if lm.relative else None,
        "floor_ms_median": lm.offset if lm.fit_kind == "anchored" else None,
        "target": {k: lm.key[k] for k in ("runtime", "batch", "threads", "quantization") if k in lm.key},
    }
