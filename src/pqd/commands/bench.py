"""``pqd bench RUN_DIR``: a finished run's models timed in every installed CPU runtime.

    pqd bench RUN_DIR [--threads 1,2] [--batch-sizes 1,64] [--runs 200] [--inherit-env]

Variants (teacher = dense FP32 model, final = the run's deployable INT8 model):

    pytorch_fp32_eager        the teacher, eager PyTorch (the baseline of every ratio)
    pytorch_int8              RUN_DIR/model_int8.pt (FX-converted, TorchScript-frozen)
    onnxruntime_fp32 / _int8  RUN_DIR/teacher_fp32.onnx / model_int8.onnx in ONNX Runtime (CPU EP)
    openvino_fp32 / _int8     the same ONNX files in OpenVINO (CPU, precision hint f32), if installed

Method: per thread count, every variant is loaded in a worker process of its own
(:mod:`pqd.measure.worker`; the ONNX Runtime and OpenVINO workers never import torch, as a
deployment would not), all with that many threads. After a warm-up the coordinator
interleaves them (:func:`pqd.measure.latency.interleave`): rounds in rotating order, one
block per variant per round, only one worker busy at a time. A block is 50 ms of untimed
calls (the hand-over from the previous variant) and then consecutive timed calls, so a
figure is the steady-state latency a serving loop sees, and machine drift hits every
variant alike. ``runs`` timed calls at batch 1 and ``large_batch_runs`` at larger
batches; median, p90, mean and std, each also as "x faster than PyTorch FP32 eager"
(FP32-eager time / this time, same threads, same batch, same run). Every worker starts in
the controlled threading environment of :func:`pqd.measure.workers.worker_environment` (the
caller's OpenMP/MKL variables removed, ``OMP_NUM_THREADS`` = the threads timed), whatever the
caller's shell holds, unless ``inherit_env`` (``--inherit-env``); ``latency_env`` records it per
thread count. A deployment timed slower at a thread count than at a smaller one is flagged
(``slower_with_more_threads``, and a warning), and the speed-up summary names the fastest
deployment over every thread count. Every runtime runs with its own defaults but the thread
count (ONNX Runtime's thread spinning stays on; OpenVINO's precision hint is set to f32, see
:mod:`pqd.deploy.runtimes`). Peak resident memory is each worker's ``VmHWM`` after all its timed
calls at the largest thread count (Linux's ``ru_maxrss`` would carry the parent's high-water
mark across fork + exec). Proxies
(parameters, MACs, MACs on non-zero weights; :mod:`pqd.measure.proxies`) sit beside the
latencies: unstructured zeros cut the proxy but not the dense kernels' work.

Why workers (docs/BENCHMARKS.md, benchmarks/independent_check.py): in one shared process
the runtimes disturb each other. Timing one call per variant per round measured each
runtime competing with the previous one's spinning pool, and once an ONNX Runtime session
had run, OpenVINO stayed slower for the life of the process (figures and the commands that
measured them: docs/BENCHMARKS.md, "How pqd times, and an independent check").

Results: ``RUN_DIR/bench.json``, ``RUN_DIR/bench.md``, and ``metrics.json["bench"]``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from pqd.config import MEASURE
from pqd.errors import ConfigError, ModelError, PqdError

log = logging.getLogger("pqd.bench")

STUDENT_LOADER = "pqd.run.loader:student_model"  # how a timing worker rebuilds an FP32 final student

BENCH_SCHEMA = 2  # 2: speedup_summary (same-runtime, best-vs-best, fastest; eager ratios as an extra)
RUNTIMES = ("pytorch", "onnxruntime", "openvino")
BASELINE = "pytorch_fp32_eager"


def default_threads() -> tuple[int, ...]:
    """(1, N) with N the cores this process may use."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return (1, n) if n > 1 else (1,)


@dataclass
class Variant:
    name: str
    runtime: str
    precision: str  # fp32 | int8
    model: str  # teacher | final (which model's proxies apply)
    spec: dict  # how a worker process builds it (pqd.measure.worker)


def runtime_versions() -> dict[str, str | None]:
    """Installed versions of the export and runtime packages (None: not installed)."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for pkg in ("onnx", "onnxscript", "onnxruntime", "openvino"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _variants(run, out: Path, runtimes: Sequence[str], batch_sizes: Sequence[int], seed: int) -> list[Variant]:
    from pqd.run.rundir import RunDir, model_kwargs

    rd = RunDir(out)
    cfg = run.config.model
    kwargs = model_kwargs(run.config)
    base = {"input_shape": list(run.input_shape), "batch_sizes": list(batch_sizes), "seed": seed}
    fin = "int8" if run.quantized else "fp32"
    fin_name = "int8" if run.quantized else "fp32_final"
    final_onnx = rd.file(rd.INT8_ONNX if run.quantized else rd.FP32_ONNX)
    vs = [
        Variant(
            BASELINE,
            "pytorch",
            "fp32",
            "teacher",
            base
            | {
                "kind": "eager",
                "model": cfg.name,
                "kwargs": kwargs,
                "num_classes": run.data.num_classes,
                "weights": str(rd.teacher_path),
            },
        )
    ]
    if "pytorch" in runtimes:
        if run.quantized:
            vs.append(
                Variant(
                    "pytorch_int8",
                    "pytorch",
                    "int8",
                    "final",
                    base | {"kind": "torchscript", "path": str(run.deployed_file)},
                )
            )
        else:
            vs.append(
                Variant(
                    "pytorch_fp32_final",
                    "pytorch",
                    "fp32",
                    "final",
                    base | {"kind": "eager_student", "run_dir": str(out), "loader": STUDENT_LOADER},
                )
            )
    for rt in ("onnxruntime", "openvino"):
        if rt in runtimes:
            vs.append(
                Variant(f"{rt}_fp32", rt, "fp32", "teacher", base | {"kind": rt, "path": str(rd.file(rd.TEACHER_ONNX))})
            )
            vs.append(Variant(f"{rt}_{fin_name}", rt, fin, "final", base | {"kind": rt, "path": str(final_onnx)}))
    return vs


def _resolve_runtimes(runtimes: Sequence[str] | None) -> tuple[list[str], dict[str, str]]:
    from pqd.deploy.runtimes import available

    explicit = runtimes is not None
    wanted = list(RUNTIMES) if runtimes is None else list(runtimes)
    bad = [r for r in wanted if r not in RUNTIMES]
    if bad:
        raise ConfigError(f"bench: unknown runtime(s) {', '.join(map(repr, bad))}; choose from {', '.join(RUNTIMES)}")
    skipped: dict[str, str] = {}
    need = {"onnxruntime": ("onnx", "onnxscript", "onnxruntime"), "openvino": ("onnx", "onnxscript", "openvino")}
    extra = {"onnxruntime": "onnx", "openvino": "openvino"}
    for rt in [r for r in wanted if r in need]:
        missing = [m for m in need[rt] if not available(m)]
        if missing:
            msg = f"{', '.join(missing)} not installed: pip install 'pqd[{extra[rt]}]'"
            if explicit:
                raise PqdError(f"bench: runtime {rt!r} requested but {msg}")
            skipped[rt] = msg
            wanted.remove(rt)
    return wanted, skipped


def _ratio(base: float, x: float) -> float | None:
    return base / x if x > 0 else None


def bench_run(
    run_dir: str | Path,
    *,
    threads: Sequence[int] | None = None,
    batch_sizes: Sequence[int] = MEASURE.batch_sizes,
    warmup: int = MEASURE.warmup,
    runs: int = MEASURE.runs,
    large_batch_runs: int = MEASURE.large_batch_runs,
    runtimes: Sequence[str] | None = None,
    rss: bool = True,
    write: bool = True,
    force_export: bool = False,
    seed: int = 0,
    allow_code: bool = False,
    inherit_env: bool = False,
) -> dict:
    """Benchmark a finished run in every installed runtime; see the module docstring.

    ``runtimes``: None = every installed one (missing ones are listed under ``skipped``);
    naming one that is not installed is an error. Returns the result dict and, with
    ``write``, writes bench.json, bench.md and the ``bench`` key of metrics.json (when the
    final write fails, the measurements are kept in a rescue file the error names). Each
    variant is first loaded and called once in a process of its own: one that crashes (a
    native runtime crash) is listed under ``failed`` and left out, the others still report.
    The run folder is locked meanwhile; model code named by import path needs ``allow_code``.
    ``inherit_env``: time in this process's environment as it is, not the controlled worker
    environment (recorded under ``latency_env``).
    """
    from pqd.run.rundir import RunDir

    with RunDir(run_dir).claim():
        return _bench_run(
            run_dir,
            threads=threads,
            batch_sizes=batch_sizes,
            warmup=warmup,
            runs=runs,
            large_batch_runs=large_batch_runs,
            runtimes=runtimes,
            rss=rss,
            write=write,
            force_export=force_export,
            seed=seed,
            allow_code=allow_code,
            inherit_env=inherit_env,
        )


def _bench_run(
    run_dir,
    *,
    threads,
    batch_sizes,
    warmup,
    runs,
    large_batch_runs,
    runtimes,
    rss,
    write,
    force_export,
    seed,
    allow_code,
    inherit_env,
) -> dict:
    from pqd.commands.export import export_run
    from pqd.measure import environment
    from pqd.measure.latency import LARGE_BATCH_BLOCKS, SMALL_BATCH_BLOCKS, interleave
    from pqd.measure.proxies import proxies
    from pqd.measure.speedup import format_thread_flag, slower_with_more_threads, speedup_summary
    from pqd.measure.workers import start_workers, workers_environment
    from pqd.run.loader import load_run

    threads = tuple(threads) if threads else default_threads()
    if any(t < 1 for t in threads) or any(b < 1 for b in batch_sizes) or runs < 1 or large_batch_runs < 1 or warmup < 0:
        raise ConfigError("bench: threads, batch sizes, runs and large-batch runs must be >= 1 and warm-up >= 0")
    out = Path(run_dir)
    wanted, skipped = _resolve_runtimes(runtimes)
    run = load_run(out, allow_code=allow_code)
    export, export_failed, failed_detail = None, {}, {}
    onnx_runtimes = [r for r in wanted if r in ("onnxruntime", "openvino")]
    if onnx_runtimes:
        try:
            export = export_run(
                out,
                force=force_export,
                run=run,
                openvino="openvino" in wanted,
                allow_code=allow_code,
                runtimes=onnx_runtimes,
            )
        except ModelError as exc:  # the ONNX runtimes cannot be timed; PyTorch still is
            log.error("bench: %s not timed: %s", " and ".join(onnx_runtimes), exc)
            export_failed = {rt: f"not timed: {exc}" for rt in onnx_runtimes}
            failed_detail = {"onnx_export": getattr(exc, "detail", str(exc))}
            wanted = [r for r in wanted if r not in onnx_runtimes]
    variants = _variants(run, out, wanted, batch_sizes, seed)
    for v in variants:
        if v.spec.get("kind") == "eager_student":
            v.spec["allow_code"] = allow_code
    failed = _probe(variants, run.config.model.name, inherit_env=inherit_env)
    variants = [v for v in variants if v.name not in failed]
    records: list[dict] = []
    settings: dict[str, dict] = {}
    rss_rec: dict[str, dict] = {}
    latency_env: dict[str, dict] = {}
    for t in threads:
        log.info("bench: %d threads, %s (one worker process each)", t, ", ".join(v.name for v in variants))
        with start_workers({v.name: v.spec | {"threads": t} for v in variants}, inherit_env=inherit_env) as workers:
            latency_env[str(t)] = workers_environment(workers)
            for v in variants:
                info = workers[v.name].info
                settings.setdefault(
                    v.name, {"runtime": v.runtime, "precision": v.precision, "model": v.model, "by_threads": {}}
                )
                settings[v.name]["by_threads"][str(t)] = info["settings"] | {
                    "worker_imports_torch": info["imports_torch"]
                }
            recs = interleave(
                workers,
                batch_sizes=tuple(batch_sizes),
                threads=t,
                warmup=warmup,
                runs=runs,
                large_batch_runs=large_batch_runs,
            )
            if rss and t == max(threads):
                for v in variants:
                    info = workers[v.name].info
                    mb = {
                        "after_import_mb": info["after_import_mb"],
                        "after_load_mb": info["after_load_mb"],
                        "peak_rss_mb": workers[v.name].rss()["peak_rss_mb"],
                    }
                    rss_rec[v.name] = {k: (round(x, 1) if x is not None else None) for k, x in mb.items()} | {
                        "threads": t
                    }
        for bs in batch_sizes:
            base = next(r for r in recs if r["batch"] == bs and r["model"] == BASELINE)
            for r in recs:
                if r["batch"] == bs:
                    v = next(v for v in variants if v.name == r["model"])
                    r["runtime"], r["precision"], r["proxy_model"] = v.runtime, v.precision, v.model
                    r["x_vs_fp32_eager"] = {k: _ratio(base[f"{k}_ms"], r[f"{k}_ms"]) for k in ("median", "p90", "mean")}
        records += recs
    # on a copy: a PTQ student's observers record every forward pass, and proxies runs one
    prox = {
        "teacher": proxies(run.teacher, run.input_shape),
        "final": proxies(copy.deepcopy(run.student.model), run.input_shape),
    }
    env = environment(max(threads)) | {"runtimes": runtime_versions()}
    thread_flags = slower_with_more_threads(records)
    for f in thread_flags:
        log.warning(
            "bench: %s; the thread counts are timed one after the other, so host drift can cause this too: "
            "re-run to confirm before deploying with more threads",
            format_thread_flag(f),
        )

    result = {
        "schema": BENCH_SCHEMA,
        # the headline: same-runtime INT8 vs FP32 per runtime, best vs best, the fastest deployment named;
        # PyTorch eager FP32 vs compiled INT8 only as a labelled extra (every ratio names both sides)
        "speedup_summary": speedup_summary(records),
        "run_dir": str(out),
        "model": run.config.model.name,
        "width": run.config.model.width,
        "stages": run.config.stage_string(),
        "final_form": "int8" if run.quantized else "fp32",
        "input_shape": list(run.input_shape),
        "settings": {
            "threads": list(threads),
            "batch_sizes": list(batch_sizes),
            "warmup": warmup,
            "runs_batch1": runs,
            "runs_large_batch": large_batch_runs,
            "interleaved": "one worker process per variant; rounds in rotating order, one block of consecutive "
            "calls per variant per round, each block starting with settle_ms of untimed calls",
            "blocks_batch1": asdict(SMALL_BATCH_BLOCKS),
            "blocks_large_batch": asdict(LARGE_BATCH_BLOCKS),
            "ratio": "x_vs_fp32_eager = PyTorch FP32 eager time / this time (same threads, batch, run); >1 is "
            "faster. A PyTorch-eager-vs-this-runtime extra; same-runtime ratios: speedup_summary",
            "peak_rss": "VmHWM of each variant's worker process after all its timed calls at the largest thread count"
            if rss
            else None,
        },
        "variants": settings,
        "skipped": skipped | ((export or {}).get("skipped") or {}),
        "failed": failed | export_failed | ((export or {}).get("failed") or {}),
        "failed_detail": failed_detail,
        "latency": records,
        # the threading environment every worker timed in, per thread count (inherited or controlled)
        "latency_env": latency_env,
        # deployments timed slower with more threads than with fewer (a warning each)
        "slower_with_more_threads": thread_flags,
        "proxies": prox,
        "peak_rss_mb": rss_rec,
        "export": {
            "route": export.get("route"),
            "artefacts": export.get("artefacts"),
            "checks": {k: v for k, v in export.get("checks", {}).items() if k.split("_")[0] in wanted},
        }
        if export
        else None,
        "env": env,
    }
    if write:
        _write(out, result)
    return result


def _probe(variants: list, model: str, *, inherit_env: bool) -> dict[str, str]:
    """Load and call each variant once in a process of its own (:func:`pqd.safety.isolate.run_isolated`),
    in the environment its worker will have: the names of those that crash or fail, with the
    reason. The FP32 baseline must work."""
    from pqd.errors import RuntimeCrash
    from pqd.measure.workers import worker_environment
    from pqd.safety.isolate import run_isolated

    failed: dict[str, str] = {}
    env = worker_environment(1, inherit_env=inherit_env).env
    for v in variants:
        try:
            run_isolated(
                "pqd.measure.worker:probe",
                {"spec": v.spec | {"threads": 1}},
                timeout=600,
                runtime=v.name,
                model=model,
                env=env,
                parent_path=True,
            )
        except (RuntimeCrash, PqdError) as exc:
            if v.name == BASELINE:
                raise
            failed[v.name] = str(exc).split("\n--- ")[0]
            log.error("bench: %s left out: %s", v.name, failed[v.name])
    return failed


def _write(out: Path, result: dict) -> None:
    from pqd.run.rundir import RunDir
    from pqd.safety.fsguard import rescue_write
    from pqd.train.checkpoint import atomic_write_bytes

    rd = RunDir(out)
    rescue_write(rd.file(rd.BENCH_JSON), json.dumps(result, indent=2).encode())
    atomic_write_bytes(rd.file(rd.BENCH_MD), (format_markdown(result) + "\n").encode())
    if rd.metrics_path.is_file() and rd.read_metrics() is None:
        log.warning("bench: %s is not valid JSON; not merging", rd.metrics_path)
        return
    rd.merge_metrics(bench=result)


def _fmt_int(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    w = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    line = lambda r: "| " + " | ".join(str(x).ljust(n) for x, n in zip(r, w, strict=True)) + " |"  # noqa: E731
    return [line(header), "|" + "|".join("-" * (n + 2) for n in w) + "|", *map(line, rows)]


def format_markdown(result: dict) -> str:
    """The bench result as markdown tables (also what ``pqd bench`` prints)."""
    env, s, prox = result["env"], result["settings"], result["proxies"]
    from pqd.measure.speedup import format_summary

    lines = [
        f"# pqd bench: {result['model']} (width {result['width']}, {result['stages']}, final {result['final_form'].upper()})",
        "",
    ]
    if result.get("speedup_summary"):
        lines += ["## Speed-ups (each names both sides and runtime)", ""]
        lines += [
            f"- {line}" if not line.startswith("  ") else f"  - {line.strip()}"
            for line in format_summary(result["speedup_summary"])
        ]
        lines += ["", "## Timings", ""]
    lines.append(
        f"CPU: {env['cpu_model']} ({env['logical_cpus']} logical CPUs; flags: {', '.join(env['cpu_flags']) or '-'}); "
        f"torch {env['torch']}, " + ", ".join(f"{k} {v}" for k, v in env["runtimes"].items() if v)
    )
    lenv = result.get("latency_env")
    if lenv:
        lines.append(format_latency_env(lenv))
    b1, bl = s.get("blocks_batch1"), s.get("blocks_large_batch")
    how = (
        f"in rotating rounds of one block per variant ({b1['settle_ms']:g} ms of untimed calls, then {b1['timed']} timed "
        f"calls at batch 1, {bl['timed']} at larger batches)"
        if b1 and bl
        else "round-robin"
    )
    lines.append(
        f"Median / p90 / std of {s['runs_batch1']} timed runs at batch 1 ({s['runs_large_batch']} at larger batches) "
        f"after {s['warmup']} warm-up runs, each variant in its own worker process, interleaved {how}. "
        '"x PyTorch FP32 eager" = PyTorch FP32 eager time / this time, same threads and batch (>1 is faster): '
        "an extra that mixes precision with runtime; the same-runtime ratios are listed above."
    )
    lines.append("")
    rss = result.get("peak_rss_mb") or {}
    rows = []
    for r in result["latency"]:
        p = prox[r["proxy_model"]]
        x = r["x_vs_fp32_eager"]
        peak = rss.get(r["model"], {}).get("peak_rss_mb")
        rows.append(
            [
                str(r["threads"]),
                str(r["batch"]),
                r["model"],
                f"{r['median_ms']:.3f}",
                f"{r['p90_ms']:.3f}",
                f"{r['std_ms']:.3f}",
                f"{r['images_per_s']:.0f}",
                f"{x['median']:.2f}x",
                f"{x['p90']:.2f}x",
                _fmt_int(p["nonzero_macs"]),
                f"{peak:.0f}" if peak else "-",
            ]
        )
    lines += _table(
        [
            "threads",
            "batch",
            "variant",
            "median ms",
            "p90 ms",
            "std ms",
            "img/s",
            "x PyTorch FP32 eager (extra, median)",
            "x PyTorch FP32 eager (extra, p90)",
            "MACs on non-zero w",
            "peak RSS MiB",
        ],
        rows,
    )
    lines += [
        "",
        "Proxies (per image; Conv/Linear only): unstructured zeros cut the MACs on non-zero weights, "
        "not the work of dense kernels.",
    ]
    lines += _table(
        ["model", "params", "non-zero params", "MACs", "MACs on non-zero weights"],
        [
            [
                k,
                _fmt_int(v["params"]),
                _fmt_int(v["nonzero_params"]),
                _fmt_int(v["macs"]),
                f"{_fmt_int(v['nonzero_macs'])} ({100 * (v['nonzero_mac_fraction'] or 0):.0f}%)",
            ]
            for k, v in prox.items()
        ],
    )
    exp = result.get("export") or {}
    if exp.get("checks"):
        lines += ["", "Exports checked on the test split (top-1 agreement with the PyTorch model they came from):"]
        lines += _table(
            ["runtime / artefact", "reference", "agreement", "top-1", "reference top-1"],
            [
                [
                    k,
                    c["reference"],
                    f"{100 * c['agreement']:.2f}%",
                    f"{100 * c['top1']:.2f}%",
                    f"{100 * c['reference_top1']:.2f}%",
                ]
                for k, c in exp["checks"].items()
            ],
        )
    ov = [v["by_threads"] for k, v in result["variants"].items() if v["runtime"] == "openvino"]
    if ov:
        hint = next(iter(ov[0].values())).get("inference_precision_hint")
        lines += ["", f"OpenVINO inference precision hint: {hint} (set explicitly)."]
    if rss:
        lines += [
            "",
            "Peak RSS: each variant's own worker process (interpreter + runtime + model + every timed call); "
            "ONNX Runtime / OpenVINO workers do not import torch.",
        ]
    if result.get("slower_with_more_threads"):
        from pqd.measure.speedup import format_thread_flag

        lines += ["", "Slower with more threads (the thread counts are timed one after the other; re-run to confirm):"]
        lines += [f"- WARNING: {format_thread_flag(f)}" for f in result["slower_with_more_threads"]]
    if result.get("skipped"):
        lines += [""] + [f"Skipped {k}: {v}" for k, v in result["skipped"].items()]
    return "\n".join(lines)


def format_latency_env(latency_env: dict) -> str:
    """One line on the threading environment of ``bench.json``'s ``latency_env`` ({threads: record})."""
    parts = []
    for t, rec in latency_env.items():
        set_ = ", ".join(f"{k}={v}" for k, v in (rec.get("variables") or {}).items() if v is not None) or "none set"
        parts.append(f"{t} thread{'s' if t != '1' else ''}: {set_}")
    inherited = any(rec.get("inherited") for rec in latency_env.values())
    ignored = next(iter(latency_env.values())).get("ignored_from_caller") or {}
    how = (
        "inherited from the caller's environment (--inherit-env)"
        if inherited
        else "controlled (the caller's threading variables removed; unset ones are the runtime's default)"
    )
    line = f"Worker threading environment: {how}; " + "; ".join(parts)
    if ignored:
        line += ". Ignored from the caller: " + ", ".join(f"{k}={v}" for k, v in ignored.items())
    return line + "."
