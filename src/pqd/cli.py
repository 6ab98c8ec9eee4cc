"""Command line: ``pqd run``, ``pqd demo``, ``pqd models``."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import sys
from importlib import resources
from pathlib import Path

import pqd
from pqd.config import MEASURE
from pqd.errors import ConfigError, PqdError


class LevelMarkFormatter(logging.Formatter):
    """Console and log.txt lines: ``12:00:01 WARNING pqd: ...`` for warnings and errors, so they do
    not read as information; information lines carry no marker (``12:00:01 pqd: ...``)."""

    def format(self, record: logging.LogRecord) -> str:
        record.levelmark = f"{record.levelname} " if record.levelno >= logging.WARNING else ""
        return super().format(record)


def _setup_logging(out: Path | None, quiet: bool) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    # under torchrun only rank 0 claims and writes the folder (log.txt included)
    if out is not None and int(os.environ.get("RANK", "0")) == 0:
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {str(out)!r} is a file, not a directory; choose a directory for the run")
        from pqd.run.rundir import RunDir

        try:  # a missing parent we cannot create, no permission, a read-only file system...
            out.mkdir(parents=True, exist_ok=True)
            handlers.append(logging.FileHandler(RunDir(out).log_path))
        except OSError as exc:
            raise ConfigError(
                f"--out {str(out)!r} cannot be used as the run directory: {exc.strerror or exc}"
            ) from None
    formatter = LevelMarkFormatter("%(asctime)s %(levelmark)s%(name)s: %(message)s", datefmt="%H:%M:%S")
    for h in handlers:
        h.setFormatter(formatter)
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, handlers=handlers, force=True)


def size_change(before: int, after: int) -> str:
    """ "3.9x smaller", "1.6x larger" or "the same size": never "0.6x smaller" for a file that grew."""
    if after == before:
        return "the same size"
    return f"{before / after:.1f}x smaller" if after < before else f"{after / before:.1f}x larger"


def format_table(metrics: dict) -> str:
    """A small human table: FP32 teacher vs final, accuracy / size / latency (from the typed metrics)."""
    from pqd.run.metrics import Metrics

    m = Metrics.from_dict(metrics)
    acc, size = m.accuracy, m.size_bytes
    rows = [("", "teacher (FP32)", f"final ({m.final_form.upper()}, {m.stages or 'dense'})")]

    def pct(value: float, ci: dict | None) -> str:
        return f"{100 * value:.2f}%" + (f" [{100 * ci['ci_low']:.1f}, {100 * ci['ci_high']:.1f}]" if ci else "")

    rows.append(
        (
            "top-1 accuracy (95% CI)" if acc.final_top1_ci else "top-1 accuracy",
            pct(acc.teacher_top1, acc.teacher_top1_ci),
            pct(acc.final_top1, acc.final_top1_ci),
        )
    )
    rows.append(("sparsity", "0%", f"{100 * m.sparsity.achieved:.1f}%"))
    rows.append(
        (
            "file size",
            f"{size.teacher_fp32 / 1e6:.2f} MB",
            f"{size.final / 1e6:.2f} MB ({size_change(size.teacher_fp32, size.final)})",
        )
    )
    sides = "PyTorch eager FP32 vs TorchScript INT8" if m.final_form == "int8" else "PyTorch eager FP32, both"
    for bs in sorted({r.batch for r in m.latency}):
        recs = {r.model: r for r in m.latency if r.batch == bs}
        t, f = recs["teacher_fp32"], recs[m.final_model_name]
        ratio = f.extra.get("ratio_to_baseline") or t.median_ms / f.median_ms
        rows.append(
            (
                f"latency b={bs} median (p90)",
                f"{t.median_ms:.2f} ms ({t.p90_ms:.2f})",
                f"{f.median_ms:.2f} ms ({f.p90_ms:.2f}), {ratio:.2f}x ({sides})",
            )
        )
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    lines = [f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows]
    if acc.test_label:
        lines.append(f"(accuracy on the {acc.test_label}; Wilson 95% intervals)")
    thr = m.latency[0].extra.get("threads") if m.latency else "?"
    harness = (
        "all models in this process (worker processes failed: see the log)"
        if any(r.extra.get("harness") == "in-process" for r in m.latency)
        else "each model in its own worker process"
    )
    lines.append(f"(latency: {thr} threads, {harness}, timed interleaved; sizes are bytes of the files on disk)")
    latency_env = m.latency_env or {}
    if latency_env.get("inherited"):
        shown = ", ".join(f"{k}={v}" for k, v in latency_env["variables"].items() if v is not None) or "none set"
        lines.append(f"(latency timed in this shell's own threading environment, not the controlled one: {shown})")
    if m.final_form == "int8":
        lines.append(
            "(the ratio above mixes INT8 with leaving PyTorch eager mode, a PyTorch-eager-vs-compiled extra; "
            "same-runtime INT8 vs FP32 speed-ups: `pqd bench RUN_DIR`)"
        )
    for warning in metrics.get("warnings") or ():
        lines.append(f"WARNING: {warning}")
    return "\n".join(lines)


def _run(config, out: Path) -> int:
    from pqd.run.pipeline import init_distributed, run_pipeline
    from pqd.run.rundir import RunDir

    init_distributed()
    metrics = run_pipeline(config, out)
    if not metrics:  # a non-zero rank under torchrun
        return 0
    print(format_table(metrics))
    print(f"\nrun directory: {out}  ({RunDir.METRICS}, model files, {RunDir.CONFIG}, {RunDir.ENV})")
    return 0


def _tune(args) -> int:
    from pqd.commands.tune import load_tune_config, tune
    from pqd.run.rundir import claim_dir

    config, tune_config = load_tune_config(args.config, args.overrides)
    with claim_dir(args.out, kind="tune"):
        _setup_logging(args.out, args.quiet)
        record = tune(config, args.out, tune_config=tune_config, executor=args.executor, address=args.address)
    choice = record["choice"]
    print(("" if choice["met"] else "NOT MET: ") + choice["message"])
    print(f"tune directory: {args.out}  (winner/, report.md, report.html, tune.json)")
    return 0 if choice["winner"] else 1


def _add_sweep_parsers(sub) -> None:
    p = sub.add_parser(
        "sweep", help="run a sweep file (base config x variants x grid) into one results table; resumable"
    )
    p.add_argument("sweep", type=Path)
    p.add_argument("--out", type=Path, required=True, help="sweep directory (re-run the same command to resume)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a value of the sweep's base config, e.g. --set data.root=PATH (repeatable)",
    )
    p.add_argument(
        "--executor", choices=("local", "ray"), default="local", help="local: one run after another (default)"
    )
    p.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray instance)")
    p.add_argument(
        "--cpus-per-run", type=float, default=None, help="Ray CPUs per run (default: max of measure/train threads)"
    )
    p.add_argument(
        "--only", action="append", default=None, metavar="VARIANT", help="run only these variants (repeatable)"
    )
    p.add_argument("--dry-run", action="store_true", help="list the expanded runs and exit")
    p.add_argument("--quiet", action="store_true")
    r = sub.add_parser("report", help="Markdown + self-contained HTML report of a sweep directory")
    r.add_argument("dir", type=Path)
    r.add_argument("--out", type=Path, default=None, help="where to write report.md/html and plots/ (default: DIR)")


def _sweep_or_report(args) -> int:
    if args.cmd == "report":
        from pqd.commands.report import build_report
        from pqd.run.rundir import claim_dir

        if args.out is None or args.out.resolve() == args.dir.resolve():
            from pqd.run.rundir import SWEEP_DIR_FILES
            from pqd.safety.fsguard import check_writable_run_dir

            if args.dir.is_dir():  # only a sweep folder pqd marked; no lock: a sweep may run
                check_writable_run_dir(args.dir, expected_files=SWEEP_DIR_FILES, kind="sweep", what="sweep folder")
            guard: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
        else:
            guard = claim_dir(args.out, kind="report")  # never over a report pqd did not write
        with guard:
            paths = build_report(args.dir, args.out)
        print(f"wrote {paths['markdown']} and {paths['html']}")
        return 0
    from pqd.commands.sweep import expand, load_sweep, run_sweep

    spec = load_sweep(args.sweep, args.overrides)
    if args.dry_run:
        sweep = expand(spec)
        for r in sweep.ordered():
            what = f"peer:{r.peer}" if r.peer else r.config_dict()["stages"] or "dense"
            print(f"{r.run_id:40s} {r.kind:8s} {what:16s} teacher {r.teacher_id}")
        print(f"{len(sweep.runs)} runs ({len(sweep.teachers())} teachers)")
        return 0
    from pqd.run.rundir import claim_dir

    with claim_dir(args.out, kind="sweep"):  # before log.txt: a user's folder is refused untouched
        _setup_logging(args.out, args.quiet)
        rows = run_sweep(
            spec,
            args.out,
            executor=args.executor,
            address=args.address,
            cpus_per_run=args.cpus_per_run,
            only=args.only,
            progress=not args.quiet,
        )
    print(f"{len(rows)} runs in {args.out / 'results.sqlite'}; next: pqd report {args.out}")
    return 0


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def _add_bench_parsers(sub) -> None:
    p = sub.add_parser("bench", help="time a finished run's models in PyTorch, ONNX Runtime and OpenVINO (interleaved)")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--threads", type=_int_list, default=None, help="thread counts, e.g. 1,2 (default: 1 and all cores)")
    p.add_argument(
        "--batch-sizes",
        type=_int_list,
        default=MEASURE.batch_sizes,
        help=f"default: {','.join(map(str, MEASURE.batch_sizes))}",
    )
    p.add_argument(
        "--runs", type=int, default=MEASURE.runs, help=f"timed runs per variant at batch 1 (default {MEASURE.runs})"
    )
    p.add_argument(
        "--large-batch-runs",
        type=int,
        default=MEASURE.large_batch_runs,
        help=f"timed runs per variant at larger batches (default {MEASURE.large_batch_runs})",
    )
    p.add_argument("--warmup", type=int, default=MEASURE.warmup)
    p.add_argument(
        "--runtimes",
        type=lambda t: tuple(x for x in t.split(",") if x),
        default=None,
        help="subset of pytorch,onnxruntime,openvino (default: every installed one)",
    )
    p.add_argument("--no-rss", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--force-export", action="store_true", help="re-export the ONNX files even if up to date")
    p.add_argument(
        "--inherit-env",
        action="store_true",
        help="time in this shell's threading environment (OMP_*, KMP_*, MKL_* ...) instead of the controlled "
        "one every worker gets by default; recorded in bench.json",
    )
    p.add_argument("--quiet", action="store_true")
    e = sub.add_parser(
        "export", help="export a finished run to ONNX (INT8 QDQ + FP32 teacher) and check it in each runtime"
    )
    e.add_argument("run_dir", type=Path)
    e.add_argument("--force", action="store_true", help="re-export even if the ONNX files are up to date")
    e.add_argument(
        "--runtimes",
        type=lambda t: tuple(x for x in t.split(",") if x),
        default=None,
        help="runtimes to check the ONNX files in: subset of onnxruntime,openvino (default: every installed one)",
    )
    e.add_argument("--quiet", action="store_true")
    for q in (p, e):
        q.add_argument(
            "--allow-code",
            action="store_true",
            help="allow importing the model code a run's config.yaml names ('pkg.module:factory'); only for runs you trust",
        )


def _bench_or_export(args) -> int:
    _setup_logging(None, args.quiet)
    if args.cmd == "export":
        from pqd.commands.export import export_run

        rec = export_run(args.run_dir, force=args.force, runtimes=args.runtimes, allow_code=args.allow_code)
        for k, a in rec["artefacts"].items():
            print(f"{k}: {args.run_dir / a['file']} ({a['bytes'] / 1e6:.2f} MB, opset {a['opset']})")
        for k, c in rec["checks"].items():
            print(f"{k}: {100 * c['agreement']:.2f}% top-1 agreement with {c['reference']} on {c['n']} test images")
        for k, v in rec.get("skipped", {}).items():
            print(f"skipped {k}: {v}")
        for k, v in rec.get("failed", {}).items():
            print(f"FAILED {k}: {v}", file=sys.stderr)
        return 2 if rec.get("failed") else 0
    from pqd.commands.bench import bench_run, format_markdown

    result = bench_run(
        args.run_dir,
        threads=args.threads,
        batch_sizes=args.batch_sizes,
        warmup=args.warmup,
        runs=args.runs,
        large_batch_runs=args.large_batch_runs,
        runtimes=args.runtimes,
        rss=not args.no_rss,
        force_export=args.force_export,
        allow_code=args.allow_code,
        inherit_env=args.inherit_env,
    )
    print(format_markdown(result))
    from pqd.run.rundir import RunDir

    rd = RunDir(args.run_dir)
    merged = "bench" in (rd.read_metrics() or {})  # not claimed when the merge was skipped
    print(
        f"\nwritten: {rd.file(rd.BENCH_JSON)}, {rd.file(rd.BENCH_MD)}" + (f", {rd.METRICS}['bench']" if merged else "")
    )
    for k, v in (result.get("failed") or {}).items():
        print(f"FAILED {k}: {v}", file=sys.stderr)
    return 2 if result.get("failed") else 0  # the rule of export too: results written, exit 2 when a runtime failed


RESUMABLE = ("run", "demo", "sweep", "export", "bench")  # commands whose finished steps are kept on disk


def interrupted_message(argv: list[str]) -> str:
    """The one line printed on Ctrl-C: what was kept and the command that resumes."""
    cmd = argv[0] if argv else ""
    again = "pqd " + shlex.join(argv)
    if cmd in RESUMABLE:
        return f"pqd: interrupted; finished steps are kept. Resume with: {again}"
    return f"pqd: interrupted; run it again with: {again}"


def main(argv: list[str] | None = None) -> int:
    """``pqd`` on the command line. Exit codes: 0 done, 2 a clear error (``pqd: error: ...``),
    130 interrupted (Ctrl-C: one line naming the command that resumes, no traceback)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print(interrupted_message(argv), file=sys.stderr)
        return 130


def _main(argv: list[str]) -> int:
    if argv[:1] == ["predict"]:  # its own parser: pqd.commands.predict owns the options
        from pqd.commands.predict import predict_main

        try:
            return predict_main(argv[1:])
        except PqdError as exc:
            print(f"pqd: error: {exc}", file=sys.stderr)
            return 2
    if argv[:1] == ["analyze"]:  # its own parser: pqd.structured.sensitivity owns the options
        from pqd.structured.sensitivity import analyze_main

        try:
            return analyze_main(argv[1:])
        except PqdError as exc:
            print(f"pqd: error: {exc}", file=sys.stderr)
            return 2
    parser = argparse.ArgumentParser(
        prog="pqd", description="Prune -> INT8 QAT -> Distill for CPU deployment, measured."
    )
    parser.add_argument("--version", action="version", version=f"pqd {pqd.__version__}")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("analyze", help="per-group pruning and per-layer INT8 sensitivity table + plot (pqd analyze --help)")
    p_run = sub.add_parser("run", help="run (or resume) a compression pipeline from a YAML config")
    p_run.add_argument("config", type=Path)
    p_run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set prune.sparsity=0.8 (repeatable)",
    )
    p_run.add_argument("--out", type=Path, required=True, help="run directory (re-run the same command to resume)")
    p_run.add_argument("--quiet", action="store_true")
    p_demo = sub.add_parser("demo", help="offline end-to-end demo on scikit-learn's digits (a few minutes on 2 cores)")
    p_demo.add_argument("--out", type=Path, default=Path("runs/demo"))
    p_demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p_demo.add_argument("--quiet", action="store_true")
    sub.add_parser(
        "predict", help="classify image files with a finished run's deployed model (pqd predict RUN_DIR IMAGE...)"
    )
    sub.add_parser("models", help="list the registered model names")
    p_cfg = sub.add_parser("config", help="print the fully resolved config (defaults filled in) as YAML")
    p_cfg.add_argument("config", type=Path, nargs="?")
    p_cfg.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p_tune = sub.add_parser(
        "tune",
        help="the fastest deployable INT8 model within tune.max_drop of your trained model (resumable)",
    )
    p_tune.add_argument("config", type=Path, help="run config without stages, plus a tune: section (docs/TUNE.md)")
    p_tune.add_argument("--out", type=Path, required=True, help="tune directory (re-run the same command to resume)")
    p_tune.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p_tune.add_argument("--executor", choices=("local", "ray"), default="local", help="ray: structured probes at once")
    p_tune.add_argument("--address", default=None, help="Ray cluster address (default: a local Ray)")
    p_tune.add_argument("--quiet", action="store_true")
    _add_sweep_parsers(sub)
    _add_bench_parsers(sub)
    args = parser.parse_args(argv)

    from pqd.run.config import load_config

    try:
        if args.cmd == "models":
            from pqd.models.registry import list_models

            print("\n".join(list_models()))
            return 0
        if args.cmd == "config":
            import yaml

            print(yaml.safe_dump(load_config(args.config, args.overrides).to_dict(), sort_keys=False), end="")
            return 0
        if args.cmd in ("sweep", "report"):
            return _sweep_or_report(args)
        if args.cmd in ("bench", "export"):
            return _bench_or_export(args)
        if args.cmd == "tune":
            return _tune(args)
        if args.cmd == "demo":
            with resources.as_file(resources.files("pqd.recipes") / "demo.yaml") as path:
                config = load_config(path, args.overrides)
        else:
            config = load_config(args.config, args.overrides)
        from pqd.run.rundir import claim_dir

        with claim_dir(args.out, kind="run"):  # check, lock, then log.txt: a user's folder is refused untouched
            _setup_logging(args.out, args.quiet)
            return _run(config, args.out)
    except PqdError as exc:
        print(f"pqd: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
