"""Command line: ``pqd run``, ``pqd demo``, ``pqd models``."""

from __future__ import annotations

import argparse

import logging
import sys
from importlib import resources
from pathlib import Path

from pqd.errors import PqdError


def _setup_logging(out: Path | None, quiet: bool) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(out / "log.txt"))
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", handlers=handlers, force=True)


def format_table(metrics: dict) -> str:
    """A small human table: FP32 teacher vs final, accuracy / size / latency."""
    acc, size = metrics["accuracy"], metrics["size_bytes"]
    final = f"final_{metrics['final_form']}"
    rows = [("", "teacher (FP32)", f"final ({metrics['final_form'].upper()}, {metrics['stages']})")]
    rows.append(("top-1 accuracy", f"{100 * acc['teacher_top1']:.2f}%", f"{100 * acc['final_top1']:.2f}%"))
    rows.append(("sparsity", "0%", f"{100 * metrics['sparsity']['achieved']:.1f}%"))
    rows.append(("file size", f"{size['teacher_fp32'] / 1e6:.2f} MB", f"{size['final'] / 1e6:.2f} MB ({size['teacher_fp32'] / size['final']:.1f}x smaller)"))
    for bs in sorted({r["batch"] for r in metrics["latency"]}):
        recs = {r["model"]: r for r in metrics["latency"] if r["batch"] == bs}
        t, f = recs["teacher_fp32"], recs[final]
        rows.append((f"latency b={bs} median (p90)", f"{t['median_ms']:.2f} ms ({t['p90_ms']:.2f})",
                     f"{f['median_ms']:.2f} ms ({f['p90_ms']:.2f}), {f['ratio_to_baseline']:.2f}x faster"))
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    lines = [f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows]
    thr = metrics["latency"][0]["threads"]
    lines.append(f"(latency: {thr} threads, variants interleaved in one process; sizes are bytes of the files on disk)")
    return "\n".join(lines)


def _run(config, out: Path) -> int:
    from pqd.pipeline import init_distributed, run_pipeline

    init_distributed()
    metrics = run_pipeline(config, out)
    if not metrics:  # a non-zero rank under torchrun
        return 0
    print(format_table(metrics))
    print(f"\nrun directory: {out}  (metrics.json, model files, config.yaml, env.json)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pqd", description="Prune -> INT8 QAT -> Distill for CPU deployment, measured.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_run = sub.add_parser("run", help="run (or resume) a compression pipeline from a YAML config")
    p_run.add_argument("config", type=Path)
    p_run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set prune.sparsity=0.8 (repeatable)")
    p_run.add_argument("--out", type=Path, required=True, help="run directory (re-run the same command to resume)")
    p_run.add_argument("--quiet", action="store_true")
    p_demo = sub.add_parser("demo", help="offline end-to-end demo on scikit-learn's digits (a few minutes on 2 cores)")
    p_demo.add_argument("--out", type=Path, default=Path("runs/demo"))
    p_demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p_demo.add_argument("--quiet", action="store_true")
    sub.add_parser("models", help="list the registered model names")
    p_cfg = sub.add_parser("config", help="print the fully resolved config (defaults filled in) as YAML")
    p_cfg.add_argument("config", type=Path, nargs="?")
    p_cfg.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)

    from pqd.config import load_config

    try:
        if args.cmd == "models":
            from pqd.registry import list_models

            print("\n".join(list_models()))
            return 0
        if args.cmd == "config":
            import yaml

            print(yaml.safe_dump(load_config(args.config, args.overrides).to_dict(), sort_keys=False), end="")
            return 0
        if args.cmd == "demo":
            with resources.as_file(resources.files("pqd.recipes") / "demo.yaml") as path:
                config = load_config(path, args.overrides)
        else:
            config = load_config(args.config, args.overrides)
        _setup_logging(args.out, args.quiet)
        return _run(config, args.out)
    except PqdError as exc:
        print(f"pqd: error: {exc}", file=sys.stderr)
        return 2



if __name__ == "__main__":
    sys.exit(main())
