"""Where does the run-to-run spread of a measured latency ratio come from?

    python benchmarks/latency_spread.py benchmarks/results/structured_vgg16_bn_adapted_bn.json \
        --repeats 6 --out benchmarks/results/latency_spread_vgg16_bn

The same pair of INT8 models (dense, and a pruned model whose widths a result JSON recorded) has
read ratios a tenth of the dense latency apart from one run to the next. This script times the
same models at three levels of repetition, ``--repeats`` times each, and reports the spread of each
pruned model's ratio to dense at each level:

- ``same_workers``: one set of worker processes, ``interleave`` called again and again;
- ``same_files``: the ONNX files exported once, a fresh set of workers (fresh compilation) each time;
- ``fresh``: export and workers afresh each time (what the structured search does per measurement).

If the spread appears only from ``same_files`` on, it is a property of the worker process (its
compilation, memory placement), and repeating a measurement in fresh workers and taking the median
ratio narrows it; if it is already there within ``same_workers``, it is the machine. The CPU's steal
time (``/proc/stat``) over each measurement is recorded beside it. Widths only decide latency, so
the models carry untrained weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_common import recorded_models, recorded_shape, recorded_target

from pqd.measure.latency import interleave
from pqd.measure.workers import start_workers
from pqd.structured import latency_model as L

ROOT = Path(__file__).resolve().parents[1]


def cpu_ticks() -> tuple[int, int]:
    """(steal, total) jiffies of all CPUs so far."""
    f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return f[7], sum(f)


def export_all(models: dict, target: L.Target, shape, folder: Path) -> dict[str, dict]:
    example = torch.zeros(2, *shape)
    specs = {}
    for i, (name, m) in enumerate(models.items()):
        part = L.export_int8(m, example, target.runtime, folder / f"m{i}")
        specs[name] = part | {
            "threads": target.threads,
            "input_shape": list(shape),
            "batch_sizes": [target.batch],
            "seed": 0,
        }
    return specs


def digest(specs: dict) -> dict[str, str]:
    return {k: hashlib.sha256(Path(s["path"]).read_bytes()).hexdigest()[:12] for k, s in specs.items()}


def timed(workers, target: L.Target, runs: int) -> dict:
    s0, t0 = cpu_ticks()
    recs = interleave(
        workers,
        batch_sizes=(target.batch,),
        threads=target.threads,
        warmup=10,
        runs=runs,
        large_batch_runs=max(3, runs // 5),
    )
    s1, t1 = cpu_ticks()
    return {"ms": {r["model"]: r["median_ms"] for r in recs}, "steal_share": (s1 - s0) / max(1, t1 - t0)}


def summarize(reps: list[dict], names: list[str]) -> dict:
    out = {}
    for k in names:
        if k == "dense":
            continue
        r = [x["ms"][k] / x["ms"]["dense"] for x in reps]
        out[k] = {
            "ratios": r,
            "median": statistics.median(r),
            "min": min(r),
            "max": max(r),
            "range_over_median": (max(r) - min(r)) / statistics.median(r),
            "cv": statistics.pstdev(r) / statistics.fmean(r),
        }
    d = [x["ms"]["dense"] for x in reps]
    out["dense_ms"] = {"values": d, "min": min(d), "max": max(d), "cv": statistics.pstdev(d) / statistics.fmean(d)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("result", help="a benchmarks/structured.py result JSON (its widths are timed)")
    ap.add_argument("--variants", default="structured@", help="prefix of the rows timed beside dense")
    ap.add_argument("--model", default=None, help="the result's model entry to time (default: its first)")
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--out", required=True, help="output stem: writes STEM.json and STEM.md")
    a = ap.parse_args(argv)
    res = json.loads(Path(a.result).read_text())
    target = recorded_target(res)
    shape = recorded_shape(res)
    m = next(e for e in res["models"] if a.model in (None, e["model"]))
    models = recorded_models(m, shape=shape, keep=lambda v: v == "dense" or v.startswith(a.variants))
    names = list(models)
    levels: dict[str, list] = {"same_workers": [], "same_files": [], "fresh": []}
    hashes = []
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="pqd_spread_") as tmp:
        specs = export_all(models, target, shape, Path(tmp))
        hashes.append(digest(specs))
        with start_workers(specs) as workers:
            for _ in range(a.repeats):
                levels["same_workers"].append(timed(workers, target, a.runs))
        for _ in range(a.repeats):
            with start_workers(specs) as workers:
                levels["same_files"].append(timed(workers, target, a.runs))
    for _ in range(a.repeats):
        with tempfile.TemporaryDirectory(prefix="pqd_spread_") as tmp:
            specs = export_all(models, target, shape, Path(tmp))
            hashes.append(digest(specs))
            with start_workers(specs) as workers:
                levels["fresh"].append(timed(workers, target, a.runs))
    out = {
        "command": " ".join(sys.argv),
        "result": a.result,
        "model": m["model"],
        "target": vars(target),
        "repeats": a.repeats,
        "runs": a.runs,
        "seconds": time.time() - t0,
        "env": {
            "cpu": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "exports_identical": all(h == hashes[0] for h in hashes),
        "levels": {k: {"reps": v, "summary": summarize(v, names)} for k, v in levels.items()},
    }
    stem = Path(a.out)
    stem.with_suffix(".json").write_text(json.dumps(out, indent=1, default=str))
    lines = [
        f"# Spread of measured latency ratios: {m['model']}, {target.runtime}, batch {target.batch}, {target.threads} threads",
        "",
        f"`{out['command']}`",
        "",
        f"{a.repeats} repeats per level, {a.runs} timed calls per model per repeat; exports byte-identical across "
        f"fresh exports: {out['exports_identical']}; {out['seconds']:.0f} s.",
        "",
        "| level | model | ratio median | min | max | (max-min)/median | dense ms min-max | steal share max |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for lv, v in out["levels"].items():
        s = v["summary"]
        steal = max(x["steal_share"] for x in v["reps"])
        for k in names[1:]:
            lines.append(
                f"| {lv} | {k} | {s[k]['median']:.3f} | {s[k]['min']:.3f} | {s[k]['max']:.3f} | "
                f"{s[k]['range_over_median']:.1%} | {s['dense_ms']['min']:.3f}-{s['dense_ms']['max']:.3f} | {steal:.1%} |"
            )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
