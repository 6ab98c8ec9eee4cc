"""Check pqd's latency figures against a timing made without pqd.

    pqd bench RUN_DIR --threads 2 --runtimes pytorch,onnxruntime
    python benchmarks/independent_check.py RUN_DIR --threads 2

Times RUN_DIR/model_int8.onnx in ONNX Runtime and RUN_DIR/model_int8.pt in PyTorch with
plain library calls (no pqd import), batch 1, same thread count, then prints each median
next to the one `pqd bench` recorded in RUN_DIR/bench.json and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np


def _time(fn, x, warmup: int, runs: int) -> float:
    for _ in range(warmup):
        fn(x)
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn(x)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=300)
    args = ap.parse_args()
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32), dtype=np.float32)

    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = args.threads, 1
    sess = ort.InferenceSession(str(args.run_dir / "model_int8.onnx"), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    ours = {"onnxruntime_int8": _time(lambda a: sess.run(None, {name: a}), x, 50, args.runs)}

    import torch

    torch.set_num_threads(args.threads)
    jit = torch.jit.load(str(args.run_dir / "model_int8.pt"))
    xt = torch.from_numpy(x)
    with torch.inference_mode():
        ours["pytorch_int8"] = _time(jit, xt, 50, args.runs)

    bench = json.loads((args.run_dir / "bench.json").read_text())
    for key, ms in ours.items():
        rec = next((r for r in bench["latency"] if r["model"] == key and r["batch"] == 1 and r["threads"] == args.threads), None)
        theirs = rec["median_ms"] if rec else float("nan")
        print(f"{key:<18} independent {ms:.3f} ms   pqd bench {theirs:.3f} ms   pqd/independent {theirs / ms:.3f}")


if __name__ == "__main__":
    main()
