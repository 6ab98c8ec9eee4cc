"""The widths a structured result chose, timed in every runtime and at a large batch.

    python benchmarks/structured_retime.py benchmarks/results/structured_224.json \
        --out benchmarks/results/structured_224_retime

``benchmarks/structured.py`` searches and times at one target (runtime, batch 1). This script takes
the widths its result JSON recorded for every model (dense, the structured models, MACs-chosen and
uniform widths at each budget) and the floor model (8 channels per group), exports each as one INT8
QDQ ONNX file, and times them all in one interleaved run per runtime: OpenVINO and ONNX Runtime,
batch 1 and ``--large-batch`` (throughput), each model in its own worker in the controlled
environment. Ratios are against dense INT8 in the same run. Latency does not depend on the weights'
values, so the models carry untrained weights. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_common import recorded_models, recorded_shape

from pqd.commands.bench import runtime_versions
from pqd.compress.channels.graph import ChannelGraph, prune_to_widths
from pqd.measure import environment
from pqd.measure.latency import interleave
from pqd.measure.workers import start_workers, workers_environment
from pqd.structured import latency_model as L

RUNTIMES = ("openvino", "onnxruntime")


def time_entry(entry: dict, shape, *, threads: int, batches: tuple[int, ...], runs: int, large_runs: int) -> dict:
    """``{runtime: {variant: {batch: median ms}}}`` for one model entry of the result, plus its MACs."""
    models = recorded_models(entry, shape=shape)
    example = torch.zeros(2, *shape)
    graph = ChannelGraph(models["dense"], example)
    models["floor"] = prune_to_widths(models["dense"], L.floor_widths(graph), example=example, round_to=1)
    timing: dict = {}
    with tempfile.TemporaryDirectory(prefix="pqd_retime_") as tmp:
        files = {
            name: L.export_int8(m, example, "openvino", Path(tmp) / name.replace("@", "_at_").replace(".", "p"))["path"]
            for name, m in models.items()
        }
        for runtime in RUNTIMES:
            specs = {
                n: {
                    "kind": runtime,
                    "path": f,
                    "input_shape": list(shape),
                    "seed": 0,
                    "threads": threads,
                    "batch_sizes": list(batches),
                }
                for n, f in files.items()
            }
            with start_workers(specs) as workers:
                env = workers_environment(workers)
                recs = interleave(workers, batch_sizes=batches, threads=threads, runs=runs, large_batch_runs=large_runs)
            timing[runtime] = {"records": recs, "latency_env": env}
    macs = {r["variant"]: r["macs"] for r in entry["rows"]}
    macs["floor"] = sum(r.macs for r in graph.layer_shapes(L.floor_widths(graph)))
    return {"model": entry["model"], "macs": macs, "dense_macs": entry["rows"][0]["dense_macs"], "timing": timing}


def median(recs: list[dict], model: str, batch: int) -> float | None:
    return next((r["median_ms"] for r in recs if r["model"] == model and r["batch"] == batch), None)


def to_markdown(res: dict) -> str:
    large = res["large_batch"]
    lines = [
        f"Command: `{res['command']}`",
        "",
        f"From: `{res['result']}` (widths searched on {res['searched_on']}). CPU: {res['env'].get('cpu_model', '?')}; "
        f"{res['threads']} threads; " + ", ".join(f"{k} {v}" for k, v in res["runtimes"].items()),
        "",
        "Each cell: latency as a fraction of dense INT8 in the same run (batch 1), or dense INT8's throughput over "
        f"the model's (batch {large}: the time per batch as a fraction of dense's). MACs ×: MACs left.",
        "",
        f"| model | variant | MACs × | OV b1 | OV b{large} | ORT b1 | ORT b{large} | dense INT8 ms (OV b1 / ORT b1) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in res["models"]:
        t = {rt: e["timing"][rt]["records"] for rt in RUNTIMES}
        for v in e["macs"]:
            cells = []
            for rt in RUNTIMES:
                for b in (1, large):
                    d, m = median(t[rt], "dense", b), median(t[rt], v, b)
                    cells.append("–" if d is None or m is None else f"{m / d:.3f}")
            dense = f"{median(t['openvino'], 'dense', 1):.3f} / {median(t['onnxruntime'], 'dense', 1):.3f}"
            lines.append(
                f"| {e['model']} | {v} | {e['macs'][v] / e['dense_macs']:.3f} | " + " | ".join(cells) + f" | {dense} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("result", help="a benchmarks/structured.py result JSON")
    ap.add_argument("--out", required=True, help="output stem: writes STEM.json and STEM.md")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--large-batch", type=int, default=32)
    ap.add_argument("--runs", type=int, default=100, help="timed calls per model at batch 1")
    ap.add_argument("--large-batch-runs", type=int, default=10)
    a = ap.parse_args(argv)
    src = json.loads(Path(a.result).read_text())
    shape = recorded_shape(src)
    torch.set_num_threads(a.threads)
    t0 = time.time()
    res = {
        "command": "python benchmarks/structured_retime.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "result": a.result,
        "searched_on": f"{src['args']['runtime']} batch {src['args']['batch']}",
        "input_shape": list(shape),
        "threads": a.threads,
        "large_batch": a.large_batch,
        "env": {k: v for k, v in environment(a.threads).items() if k != "cpu_flags"},
        "runtimes": runtime_versions(),
        "models": [],
    }
    for entry in src["models"]:
        res["models"].append(
            time_entry(
                entry,
                shape,
                threads=a.threads,
                batches=(1, a.large_batch),
                runs=a.runs,
                large_runs=a.large_batch_runs,
            )
        )
        print(f"{entry['model']}: timed ({time.time() - t0:.0f} s)", file=sys.stderr)
    res["seconds"] = time.time() - t0
    out = Path(a.out)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str))
    out.with_suffix(".md").write_text(to_markdown(res))
    print(to_markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
