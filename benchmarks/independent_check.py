"""Check pqd's latency figures against timings made without pqd.

    pqd run configs/resnet18_cifar10_cpu.yaml --set model.width=1.0 ... --out RUN_DIR
    python benchmarks/independent_check.py RUN_DIR --threads 2 --repeats 3

Each repeat runs ``pqd bench RUN_DIR --threads T --batch-sizes 1 --no-rss`` (all
each variant in its own worker process, interleaved, as pqd measures), then times each INT8 file of the
run in its own fresh Python process with nothing but the runtime's public API, the same
thread count and the threading variables pqd's workers recorded (``latency_env`` in
bench.json; no pqd import): 50 warm-up calls, then ``--runs`` (default 2,000, about
2 s for ResNet-18, so that a short burst of host noise cannot decide the figure) calls
back to back, median.

    pytorch_int8      torch.jit.load(RUN_DIR/model_int8.pt)
    onnxruntime_int8  onnxruntime.InferenceSession(RUN_DIR/model_int8.onnx), default options
                      but intra_op_num_threads
    openvino_int8     openvino compile_model(RUN_DIR/model_int8.onnx reshaped to batch 1,
                      "CPU", the configuration pqd records in bench.json: threads,
                      precision hint f32, latency hint, one stream, no pinning)

Repeats alternate pqd and the independent timings so machine drift between processes
shows up as spread rather than bias; the criterion uses the median over repeats of the
ratio pqd / independent within a repeat (timings seconds apart), and the ratio of the two
medians is printed beside it. Prints and writes (``--out``, default
benchmarks/results/independent_check.{json,md}) each runtime's median over repeats from
both sides and their ratio, and checks the issue-3 criterion: the fastest runtime's pqd
figure lies within 10% of the independent one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

TIMER = r"""
import json, statistics, sys, time
import numpy as np
kind, path, threads, runs, ov_config = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), json.loads(sys.argv[5])
x = np.random.default_rng(0).standard_normal((1, 3, 32, 32), dtype=np.float32)
if kind == "pytorch_int8":
    import torch
    torch.set_num_threads(threads)
    m = torch.jit.load(path)
    xt = torch.from_numpy(x)
    def f():
        with torch.inference_mode():
            m(xt)
elif kind == "onnxruntime_int8":
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    f = lambda: s.run(None, {name: x})
else:
    import openvino as ov
    core = ov.Core()
    model = core.read_model(path)
    model.reshape({model.inputs[0]: list(x.shape)})
    req = core.compile_model(model, "CPU", ov_config | {"INFERENCE_NUM_THREADS": threads}).create_infer_request()
    f = lambda: req.infer([x])
for _ in range(50):
    f()
ts = []
for _ in range(runs):
    t0 = time.perf_counter()
    f()
    ts.append(time.perf_counter() - t0)
print(json.dumps({"median_ms": statistics.median(ts) * 1e3}))
"""

FILES = {"pytorch_int8": "model_int8.pt", "onnxruntime_int8": "model_int8.onnx", "openvino_int8": "model_int8.onnx"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "independent_check")
    args = ap.parse_args()
    pqd_ms: dict[str, list[float]] = {k: [] for k in FILES}
    ind_ms: dict[str, list[float]] = {k: [] for k in FILES}
    env = {k: v for k, v in os.environ.items()}
    bench: dict = {}
    for rep in range(args.repeats):
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pqd.cli",
                "bench",
                str(args.run_dir),
                "--threads",
                str(args.threads),
                "--batch-sizes",
                "1",
                "--no-rss",
                "--quiet",
            ],
            check=True,
            env=env,
            stdout=subprocess.DEVNULL,
        )
        bench = json.loads((args.run_dir / "bench.json").read_text())
        ov_settings = next(iter(bench["variants"].get("openvino_int8", {}).get("by_threads", {"": {}}).values()))
        ov_config = {
            k: (int(v) if v.isdigit() else {"True": True, "False": False}.get(v, v))
            for k, v in ov_settings.get("config", {}).items()
        }
        # the independent timer gets the threading environment pqd's workers recorded (the same variables)
        lenv = (bench.get("latency_env") or {}).get(str(args.threads)) or {}
        timer_env = (
            env
            if not lenv or lenv.get("inherited")
            else (
                {k: v for k, v in env.items() if k not in (lenv.get("ignored_from_caller") or {})}
                | {k: v for k, v in (lenv.get("variables") or {}).items() if v is not None}
            )
        )
        for key, fname in FILES.items():
            rec = next((r for r in bench["latency"] if r["model"] == key and r["batch"] == 1), None)
            if rec is None:
                continue
            pqd_ms[key].append(rec["median_ms"])
            out = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    TIMER,
                    key,
                    str(args.run_dir / fname),
                    str(args.threads),
                    str(args.runs),
                    json.dumps(ov_config),
                ],
                check=True,
                capture_output=True,
                text=True,
                env=timer_env,
            )
            ind_ms[key].append(json.loads(out.stdout.strip().splitlines()[-1])["median_ms"])
        print(
            f"repeat {rep + 1}: "
            + ", ".join(
                f"{k} pqd {pqd_ms[k][-1]:.3f} / independent {ind_ms[k][-1]:.3f} ms" for k in FILES if pqd_ms[k]
            ),
            flush=True,
        )
    rows = []
    for key in FILES:
        if not pqd_ms[key]:
            continue
        p, i = statistics.median(pqd_ms[key]), statistics.median(ind_ms[key])
        paired = statistics.median(a / b for a, b in zip(pqd_ms[key], ind_ms[key], strict=True))
        rows.append(
            {
                "runtime": key,
                "pqd_median_ms": p,
                "independent_median_ms": i,
                "pqd_over_independent": p / i,
                "paired_ratio_median": paired,
                "pqd_per_repeat": pqd_ms[key],
                "independent_per_repeat": ind_ms[key],
            }
        )
    fastest = min(rows, key=lambda r: r["pqd_median_ms"])
    ok = abs(fastest["paired_ratio_median"] - 1) <= 0.10
    e = bench["env"]
    result = {
        "run_dir": str(args.run_dir),
        "model": bench["model"],
        "width": bench["width"],
        "threads": args.threads,
        "runs": args.runs,
        "repeats": args.repeats,
        "rows": rows,
        "fastest": fastest["runtime"],
        "within_10pct": ok,
        "env": e,
        "pqd_settings": bench["settings"],
        "command": " ".join(["python", "benchmarks/independent_check.py", *sys.argv[1:]]),
    }
    lines = [
        f"# Independent latency check: {bench['model']} width {bench['width']}, batch 1, {args.threads} threads",
        "",
        f"CPU: {e['cpu_model']}; torch {e['torch']}, " + ", ".join(f"{k} {v}" for k, v in e["runtimes"].items() if v),
        f"Command: `{result['command']}`",
        "",
        "| runtime | pqd bench median ms | independent median ms | ratio of medians | median of per-repeat ratios "
        "| per repeat (pqd / independent) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        per = "; ".join(
            f"{a:.3f} / {b:.3f}" for a, b in zip(r["pqd_per_repeat"], r["independent_per_repeat"], strict=True)
        )
        lines.append(
            f"| {r['runtime']} | {r['pqd_median_ms']:.3f} | {r['independent_median_ms']:.3f} | {r['pqd_over_independent']:.3f} "
            f"| {r['paired_ratio_median']:.3f} | {per} |"
        )
    lines += [
        "",
        f"Fastest runtime by pqd: {fastest['runtime']}; pqd / independent, median of the per-repeat ratios "
        f"(each repeat pairs timings taken seconds apart): {fastest['paired_ratio_median']:.3f} "
        f"-> {'within' if ok else 'NOT within'} 10%.",
    ]
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(text + "\n")


if __name__ == "__main__":
    main()
