"""Effect of rounding channel counts (round_to 1 / 8 / 16) on measured INT8 latency.

    python benchmarks/structured_rounding.py                       # ResNet-18 x0.5, OpenVINO, batch 1, 2 threads
    python benchmarks/structured_rounding.py --quick               # ResNet-18 x0.25, 3 configurations, fewer runs

For several random per-group keep ratios (and a few uniform ones), the same ratios are
turned into channel counts rounded *up* to multiples of 1, 8 and 16, and every resulting
architecture is quantized (static INT8), exported and timed in one interleaved run on the
target. Rounding up keeps more channels (more MACs); the question is whether aligned
counts run faster anyway. Results: benchmarks/results/structured_rounding{,_quick}.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

import torch

from pqd.compress.channels.graph import ChannelGraph, prune_to_widths, round_width
from pqd.measure.env import environment
from pqd.models.registry import create_model
from pqd.structured import latency_model as L

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--width", type=float, default=0.5)
    p.add_argument("--runtime", default="openvino", choices=L.RUNTIMES)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--configs", type=int, default=6, help="random keep-ratio configurations (plus uniform 0.7 and 0.45)"
    )
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args(argv)
    if a.quick:
        a.width, a.configs, a.runs = 0.25, 1, 60
    torch.manual_seed(0)
    model = create_model(a.model, num_classes=10, width=a.width).eval()
    x = torch.zeros(2, 3, 32, 32)
    graph = ChannelGraph(model, x)
    chans = graph.widths()
    rng = random.Random(0)
    ratio_sets = {"uniform0.7": {g: 0.7 for g in chans}, "uniform0.45": {g: 0.45 for g in chans}}
    for i in range(a.configs):
        ratio_sets[f"random{i}"] = {g: rng.uniform(0.3, 0.9) for g in chans}
    models, meta = {}, {}
    for name, ratios in ratio_sets.items():
        for rt in (1, 8, 16):
            w = {g: round_width(c * ratios[g], c, rt) for g, c in chans.items()}
            key = f"{name}/r{rt}"
            models[key] = prune_to_widths(model, w, example=x, round_to=1)
            meta[key] = {
                "config": name,
                "round_to": rt,
                "widths": w,
                "macs": sum(r.macs for r in graph.layer_shapes(w)),
            }
    ms = L.measure_int8(models, target=L.Target(a.runtime, a.batch, a.threads), input_shape=(3, 32, 32), runs=a.runs)
    rows = [{**meta[k], "measured_ms": ms[k]} for k in models]
    lines = [
        f"# round_to vs measured INT8 latency ({a.model} x{a.width}, {a.runtime}, batch {a.batch}, {a.threads} threads)",
        "",
        f"Command: `python benchmarks/structured_rounding.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        "",
        "| config | r1 ms | r8 ms | r16 ms | r1 MMACs | r8 MMACs | r16 MMACs | r8/r1 | r16/r1 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    ratios8, ratios16 = [], []
    for name in ratio_sets:
        r = {rt: next(x for x in rows if x["config"] == name and x["round_to"] == rt) for rt in (1, 8, 16)}
        q8, q16 = r[8]["measured_ms"] / r[1]["measured_ms"], r[16]["measured_ms"] / r[1]["measured_ms"]
        ratios8.append(q8)
        ratios16.append(q16)
        lines.append(
            f"| {name} | {r[1]['measured_ms']:.3f} | {r[8]['measured_ms']:.3f} | {r[16]['measured_ms']:.3f} | "
            f"{r[1]['macs'] / 1e6:.1f} | {r[8]['macs'] / 1e6:.1f} | {r[16]['macs'] / 1e6:.1f} | {q8:.3f} | {q16:.3f} |"
        )
    lines += [
        "",
        f"Median latency ratio to round_to=1: round_to=8 {statistics.median(ratios8):.3f}, "
        f"round_to=16 {statistics.median(ratios16):.3f} (below 1: the rounded, larger model is faster).",
    ]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "structured_rounding_quick" if a.quick else "structured_rounding"
    (out / f"{stem}.json").write_text(
        json.dumps(
            {
                "args": vars(a),
                "env": {k: v for k, v in environment(a.threads).items() if k != "cpu_flags"},
                "rows": rows,
            },
            indent=1,
        )
    )
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
