"""Does the chosen model's latency ratio to dense depend on how many models share the interleaved run?

    python benchmarks/structured_consistency.py runs/structured_vgg/structured.json --out runs/consistency.json

The structured search measures the chosen model beside the dense model (two worker processes);
benchmarks/structured.py's final table measures every variant together (ten or more worker
processes). This script takes the widths a result JSON recorded and times the same INT8 models
on the same target in three arrangements: each model alone in its own run; dense + one chosen
model (as the search does); and all the result's variants together (as the final table does).
It reports each chosen model's ratio to dense in each arrangement.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench_common import SHAPE, recorded_models, recorded_target

from pqd.structured import latency_model as L

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("result")
    ap.add_argument(
        "--teacher", help="teacher safetensors (widths only matter for latency; default: untrained weights)"
    )
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    res = json.loads(Path(a.result).read_text())
    target = recorded_target(res)
    shape = SHAPE
    out = {"result": a.result, "target": vars(target) if hasattr(target, "__dict__") else str(target), "models": []}
    for m in res["models"]:
        models = recorded_models(m, teacher_weights=a.teacher)
        chosen = [k for k in models if k.startswith("structured@")]
        rec = {"model": m["model"], "alone": [], "pairs": [], "all": []}
        t0 = time.time()
        for _ in range(a.repeats):
            rec["alone"].append(
                {
                    k: L.measure_int8({k: models[k]}, target=target, input_shape=shape, runs=a.runs)[k]
                    for k in ["dense"] + chosen
                }
            )
            rec["pairs"].append(
                {
                    k: L.measure_int8(
                        {"dense": models["dense"], k: models[k]}, target=target, input_shape=shape, runs=a.runs
                    )
                    for k in chosen
                }
            )
            rec["all"].append(L.measure_int8(models, target=target, input_shape=shape, runs=a.runs))
        rec["ratios"] = {
            k: {
                "alone": [x[k] / x["dense"] for x in rec["alone"]],
                "pair": [p[k][k] / p[k]["dense"] for p in rec["pairs"]],
                "all": [x[k] / x["dense"] for x in rec["all"]],
                "budget": float(k.split("@")[1]),
            }
            for k in chosen
        }
        rec["seconds"] = time.time() - t0
        out["models"].append(rec)
        for k, r in rec["ratios"].items():
            print(
                m["model"],
                k,
                {kk: [round(x, 3) for x in v] if isinstance(v, list) else v for kk, v in r.items()},
                flush=True,
            )
    Path(a.out).write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
