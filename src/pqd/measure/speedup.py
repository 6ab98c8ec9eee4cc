"""Speed-ups that name both sides: same-runtime INT8 vs FP32, best deployment vs best
deployment, and the fastest measured deployment per batch size and thread count.

A bare "5x faster" hides what it compares. Timing the FP32 teacher in PyTorch eager mode
against the INT8 model in a compiled runtime mixes the gain of INT8 with the gain of
leaving eager mode; a user who deploys FP32 uses a fast runtime too. So every ratio here is
a dict that carries both sides::

    {"ratio": 2.4, "numerator": "teacher FP32 @ OpenVINO", "denominator": "pqd INT8 @ OpenVINO",
     "numerator_ms": 1.9, "denominator_ms": 0.79, "batch": 1, "threads": 2, "stat": "median",
     "kind": "same_runtime"}

``ratio = numerator time / denominator time``: above 1 the denominator is faster.

Input: latency records as :func:`pqd.measure.latency.interleave` makes them and ``pqd bench``
(``runtime``, ``precision``, ``proxy_model`` fields), a pipeline run
(``teacher_fp32`` / ``final_int8`` / ``final_fp32``, all PyTorch) or
:func:`pqd.commands.peers.time_peer` (``source_model``) annotates them: ``model`` (variant name),
``batch``, ``threads``, ``median_ms``, ``p90_ms``. Records of several bench calls may be
concatenated; ratios only pair records of the same batch and thread count.

More threads are not always faster (a small model on few cores can lose more to
synchronisation than it gains): :func:`slower_with_more_threads` flags a deployment that timed
slower at a thread count than at a smaller one, and :func:`fastest_over_threads` names the
fastest deployment of each batch size over every thread count, with its thread count.

Kinds: ``same_runtime`` (both sides in one runtime and form: ONNX Runtime, OpenVINO),
``pytorch_eager_vs_compiled`` (PyTorch FP32 eager vs TorchScript INT8: the same library but
not the same execution mode; kept as a labelled extra), ``best_deployment`` (the fastest
INT8 deployment of a model over every runtime vs the fastest FP32 teacher deployment).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

RUNTIME_LABELS = {"pytorch": "PyTorch", "onnxruntime": "ONNX Runtime", "openvino": "OpenVINO"}
SOURCE_LABELS = {"teacher": "teacher", "final": "pqd", "nncf_ptq": "NNCF PTQ"}
STATS = ("median", "p90", "mean")


@dataclass(frozen=True)
class Deployment:
    """One timed variant: which model (``source``), in which runtime/form, at which precision."""

    name: str  # the record's ``model`` (variant name)
    source: str  # teacher | final | nncf_ptq | ...
    runtime: str  # pytorch | onnxruntime | openvino | ...
    precision: str  # fp32 | int8
    form: str  # eager | TorchScript | "" (the runtime has one form)
    batch: int
    threads: int
    times_ms: Mapping[str, float | None]

    @property
    def runtime_label(self) -> str:
        rt = RUNTIME_LABELS.get(self.runtime, self.runtime)
        return f"{rt} {self.form}" if self.form else rt

    @property
    def label(self) -> str:
        return f"{SOURCE_LABELS.get(self.source, self.source)} {self.precision.upper()} @ {self.runtime_label}"

    def time(self, stat: str) -> float | None:
        return self.times_ms.get(stat)


def _infer(rec: Mapping[str, Any]) -> tuple[str, str, str]:
    """(source, runtime, precision) of a record, from its fields or its variant name."""
    name = str(rec["model"])
    runtime = rec.get("runtime")
    precision = rec.get("precision")
    source = rec.get("source_model") or ("nncf_ptq" if name.startswith("nncf") else rec.get("proxy_model"))
    if runtime is None:  # a pipeline run's records: teacher_fp32 / final_int8 / final_fp32, all PyTorch
        runtime = "pytorch"
    if precision is None:
        precision = "int8" if "int8" in name else "fp32"
    if source is None:
        source = "teacher" if name.startswith("teacher") else "nncf_ptq" if name.startswith("nncf") else "final"
    return str(source), str(runtime), str(precision)


def deployments(records: Iterable[Mapping[str, Any]]) -> list[Deployment]:
    """Normalise latency records (see the module docstring) into :class:`Deployment` s."""
    out = []
    for r in records:
        source, runtime, precision = _infer(r)
        form = ""
        if runtime == "pytorch":
            form = "TorchScript" if precision == "int8" else "eager"
        out.append(
            Deployment(
                str(r["model"]),
                source,
                runtime,
                precision,
                form,
                int(r["batch"]),
                int(r["threads"]),
                {s: r.get(f"{s}_ms") for s in STATS},
            )
        )
    return out


def _check_stat(stat: str) -> None:
    if stat not in STATS:
        raise ValueError(f"stat {stat!r} is not valid; choose from {', '.join(STATS)}")


def ratio_record(numerator: Deployment, denominator: Deployment, *, stat: str = "median", kind: str) -> dict:
    """``numerator`` time / ``denominator`` time, labelled with both sides (>1: the denominator is faster)."""
    _check_stat(stat)
    if (numerator.batch, numerator.threads) != (denominator.batch, denominator.threads):
        raise ValueError(f"ratio of {numerator.label} and {denominator.label} at different batch/threads")
    tn, td = numerator.time(stat), denominator.time(stat)
    return {
        "ratio": (tn / td) if tn and td else None,
        "numerator": numerator.label,
        "denominator": denominator.label,
        "numerator_ms": tn,
        "denominator_ms": td,
        "numerator_variant": numerator.name,
        "denominator_variant": denominator.name,
        "batch": numerator.batch,
        "threads": numerator.threads,
        "stat": stat,
        "kind": kind,
    }


def _groups(deps: Sequence[Deployment]) -> dict[tuple[int, int], list[Deployment]]:
    out: dict[tuple[int, int], list[Deployment]] = {}
    for d in deps:
        out.setdefault((d.batch, d.threads), []).append(d)
    return dict(sorted(out.items(), key=lambda kv: (kv[0][1], kv[0][0])))


def same_runtime_ratios(records: Iterable[Mapping[str, Any]], *, stat: str = "median") -> list[dict]:
    """For each runtime: teacher FP32 there vs every other model's deployment there.

    ONNX Runtime / OpenVINO pairs are ``same_runtime``; PyTorch's FP32 eager vs INT8
    TorchScript pair is ``pytorch_eager_vs_compiled`` (a labelled extra, not a headline).
    Runtimes without a teacher FP32 record give no ratio.
    """
    _check_stat(stat)
    out = []
    for _, deps in _groups(deployments(records)).items():
        for d in deps:
            if d.source == "teacher":
                continue
            base = next(
                (t for t in deps if t.source == "teacher" and t.precision == "fp32" and t.runtime == d.runtime), None
            )
            if base is None:
                continue
            kind = "same_runtime" if base.form == d.form else f"{d.runtime}_{base.form.lower()}_vs_compiled"
            out.append(ratio_record(base, d, stat=stat, kind=kind))
    return out


def _ranked(deps: Iterable[Deployment], stat: str) -> list[Deployment]:
    """The deployments timed at ``stat``, fastest first (ties in their order)."""
    timed = [(t, d) for d in deps if (t := d.time(stat))]
    return [d for _, d in sorted(timed, key=lambda td: td[0])]


def _fastest(deps: Iterable[Deployment], stat: str) -> Deployment | None:
    return next(iter(_ranked(deps, stat)), None)


def _ms(d: Deployment, stat: str) -> float:
    """The time at ``stat`` of a deployment known to be timed there (one :func:`_ranked` kept)."""
    t = d.time(stat)
    if not t:
        raise ValueError(f"{d.label} has no {stat} time")
    return t


def best_deployment_ratios(
    records: Iterable[Mapping[str, Any]], *, stat: str = "median", sources: Sequence[str] = ("final", "nncf_ptq")
) -> list[dict]:
    """Fastest INT8 deployment of each model in ``sources`` (over runtimes) vs the fastest FP32 teacher deployment."""
    _check_stat(stat)
    out = []
    for _, deps in _groups(deployments(records)).items():
        base = _fastest((d for d in deps if d.source == "teacher" and d.precision == "fp32"), stat)
        if base is None:
            continue
        for src in sources:
            best = _fastest((d for d in deps if d.source == src and d.precision == "int8"), stat)
            if best is not None:
                out.append(ratio_record(base, best, stat=stat, kind="best_deployment"))
    return out


def fastest_deployments(records: Iterable[Mapping[str, Any]], *, stat: str = "median") -> list[dict]:
    """Per (batch, threads): the fastest measured deployment of all, the fastest FP32 one and
    the fastest INT8 one, and how the fastest compares with the runner-up."""
    _check_stat(stat)
    out = []
    every = deployments(records)
    for (bs, th), deps in _groups(every).items():
        ranked = _ranked(deps, stat)
        if not ranked:
            continue
        best = ranked[0]
        fp32 = _fastest((d for d in deps if d.precision == "fp32"), stat)
        int8 = _fastest((d for d in deps if d.precision == "int8"), stat)
        runner = next((d for d in ranked[1:] if d.label != best.label), None)
        out.append(
            {
                "batch": bs,
                "threads": th,
                "stat": stat,
                "fastest": best.label,
                "fastest_variant": best.name,
                "fastest_ms": best.time(stat),
                "fastest_precision": best.precision,
                "fastest_fp32": fp32.label if fp32 else None,
                "fastest_int8": int8.label if int8 else None,
                "int8_is_fastest": best.precision == "int8",
                "vs_runner_up": ratio_record(runner, best, stat=stat, kind="fastest_vs_runner_up") if runner else None,
                "faster_with_fewer_threads": _faster_with_fewer(best, every, stat),
            }
        )
    return out


def _faster_with_fewer(best: Deployment, every: Sequence[Deployment], stat: str) -> dict | None:
    """The same deployment at fewer threads, when it timed faster there: ``{"threads", "ms"}``."""
    fewer = _fastest(
        (d for d in every if d.name == best.name and d.batch == best.batch and d.threads < best.threads), stat
    )
    if fewer is None or _ms(fewer, stat) >= _ms(best, stat):
        return None
    return {"threads": fewer.threads, "ms": fewer.time(stat)}


#: A deployment is flagged when it is more than this much slower at a larger thread count, so that
#: the noise between two medians of the same speed is not flagged.
THREAD_SLOWDOWN_MARGIN = 1.10


def _thread_label(n: int) -> str:
    return f"{n} thread{'s' if n != 1 else ''}"


def slower_with_more_threads(
    records: Iterable[Mapping[str, Any]], *, stat: str = "median", margin: float = THREAD_SLOWDOWN_MARGIN
) -> list[dict]:
    """Each (deployment, batch, thread count) whose ``stat`` is more than ``margin`` times the
    fastest reading of the same deployment and batch at fewer threads."""
    _check_stat(stat)
    by: dict[tuple, list[Deployment]] = {}
    for d in deployments(records):
        if d.time(stat):
            by.setdefault((d.name, d.batch), []).append(d)
    out = []
    for (_, batch), deps in by.items():
        for d in sorted(deps, key=lambda x: x.threads):
            fewer = _fastest((x for x in deps if x.threads < d.threads), stat)
            if fewer is not None and _ms(d, stat) > margin * _ms(fewer, stat):
                out.append(
                    {
                        "variant": d.name,
                        "deployment": d.label,
                        "runtime": d.runtime,
                        "precision": d.precision,
                        "batch": batch,
                        "threads": d.threads,
                        "ms": d.time(stat),
                        "fewer_threads": fewer.threads,
                        "fewer_threads_ms": fewer.time(stat),
                        "ratio": _ms(d, stat) / _ms(fewer, stat),
                        "stat": stat,
                    }
                )
    return out


def format_thread_flag(f: Mapping[str, Any]) -> str:
    """One line for a :func:`slower_with_more_threads` entry."""
    return (
        f"{f['deployment']} is {f['ratio']:.2f}x slower with {_thread_label(f['threads'])} than with "
        f"{_thread_label(f['fewer_threads'])} (batch {f['batch']}, {f['stat']} {f['ms']:.3f} vs {f['fewer_threads_ms']:.3f} ms)"
    )


def fastest_over_threads(records: Iterable[Mapping[str, Any]], *, stat: str = "median") -> list[dict]:
    """Per batch size timed at more than one thread count: the fastest deployment over all of
    them, with the thread count it was fastest at."""
    _check_stat(stat)
    by: dict[int, list[Deployment]] = {}
    for d in deployments(records):
        by.setdefault(d.batch, []).append(d)
    out = []
    for bs, deps in sorted(by.items()):
        best = _fastest(deps, stat)
        counts = sorted({d.threads for d in deps})
        if best is None or len(counts) < 2:
            continue
        out.append(
            {
                "batch": bs,
                "stat": stat,
                "threads_timed": counts,
                "fastest": best.label,
                "fastest_variant": best.name,
                "threads": best.threads,
                "fastest_ms": best.time(stat),
            }
        )
    return out


def speedup_summary(records: Iterable[Mapping[str, Any]], *, stat: str = "median") -> dict:
    """Everything above in one dict: ``same_runtime`` (headline), ``best_deployment``,
    ``pytorch_eager_extra`` (PyTorch eager vs compiled, labelled extra), ``fastest`` (per batch and
    thread count) and ``fastest_over_threads`` (per batch, naming the thread count)."""
    recs = list(records)
    same = same_runtime_ratios(recs, stat=stat)
    return {
        "stat": stat,
        "ratio": "numerator time / denominator time (>1: the denominator is faster)",
        "same_runtime": [r for r in same if r["kind"] == "same_runtime"],
        "best_deployment": best_deployment_ratios(recs, stat=stat),
        "pytorch_eager_extra": [r for r in same if r["kind"] != "same_runtime"],
        "fastest": fastest_deployments(recs, stat=stat),
        "fastest_over_threads": fastest_over_threads(recs, stat=stat),
    }


def format_ratio(r: Mapping[str, Any]) -> str:
    """One line: ``2.41x faster: pqd INT8 @ OpenVINO vs teacher FP32 @ OpenVINO (batch 1, 2 threads, median 0.790 vs 1.904 ms)``."""
    where = f"batch {r['batch']}, {r['threads']} thread{'s' if r['threads'] != 1 else ''}"
    if r["ratio"] is None:
        return f"n/a: {r['denominator']} vs {r['numerator']} ({where})"
    x = r["ratio"]
    how = f"{x:.2f}x faster" if x >= 1 else f"{1 / x:.2f}x slower"
    return (
        f"{how}: {r['denominator']} vs {r['numerator']} ({where}, {r['stat']} {r['denominator_ms']:.3f} vs "
        f"{r['numerator_ms']:.3f} ms)"
    )


def format_summary(summary: Mapping[str, Any]) -> list[str]:
    """Console / README lines for :func:`speedup_summary`'s dict, headline first."""
    lines = []
    titles = (
        ("same_runtime", "Same runtime, INT8 vs FP32 teacher:"),
        ("best_deployment", "Best deployment vs best FP32 deployment:"),
        ("pytorch_eager_extra", "Extra (PyTorch eager FP32 vs compiled INT8; includes leaving eager mode):"),
    )
    for key, title in titles:
        if summary.get(key):
            lines.append(title)
            lines += [f"  {format_ratio(r)}" for r in summary[key]]
    for f in summary.get("fastest") or []:
        where = f"batch {f['batch']}, {f['threads']} thread{'s' if f['threads'] != 1 else ''}"
        line = f"Fastest measured deployment ({where}): {f['fastest']} ({f['fastest_ms']:.3f} ms {f['stat']})"
        if f["vs_runner_up"] and f["vs_runner_up"]["ratio"]:
            line += f", {f['vs_runner_up']['ratio']:.2f}x ahead of {f['vs_runner_up']['numerator']}"
        if not f["int8_is_fastest"]:
            line += " - FP32, not INT8"
        if f.get("faster_with_fewer_threads"):
            few = f["faster_with_fewer_threads"]
            line += f" - faster with {_thread_label(few['threads'])} ({few['ms']:.3f} ms)"
        lines.append(line)
    for f in summary.get("fastest_over_threads") or []:
        lines.append(
            f"Fastest measured deployment at batch {f['batch']} over {', '.join(map(str, f['threads_timed']))} threads: "
            f"{f['fastest']} with {_thread_label(f['threads'])} ({f['fastest_ms']:.3f} ms {f['stat']})"
        )
    return lines
