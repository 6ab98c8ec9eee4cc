"""Leave-one-out error of the structured latency model, fitted in milliseconds against fitted
relative to the dense model measured in the same run (:mod:`pqd.structured.latency_model`).

    python benchmarks/latency_model_fit.py \
        resnet18=benchmarks/results/latency_samples_resnet18.json \
        vgg16_bn=benchmarks/results/latency_samples_vgg16_bn.json --out benchmarks/results/latency_model_fit

Each input is a latency cache file (``<pqd cache>/structured_latency/*.json``) of a full-width
CIFAR model: every sample's widths, its measured INT8 latency and, where recorded, the dense
model's latency measured in the same run (``dense_ms``). Both fits use the same samples; the
absolute one ignores ``dense_ms``. An error is predicted / measured − 1 for a sample left out
of the fit; a relative prediction is anchored to the dense reading of the sample's own run, as
the search checks a fractional budget. Nothing is measured here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from pqd.compress.channels.graph import ChannelGraph
from pqd.models.registry import create_model
from pqd.structured import latency_model as L

ROOT = Path(__file__).resolve().parents[1]


def summary(errs, sources, which=None) -> dict:
    e = np.abs([x for x, s in zip(errs, sources, strict=True) if which is None or s == which])
    return {
        "n": int(len(e)),
        "mean_abs": float(e.mean()),
        "max_abs": float(e.max()),
        "within_10pct": int((e <= 0.10).sum()),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", metavar="MODEL=CACHE.json")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "latency_model_fit"))
    a = p.parse_args(argv)
    result = {
        "command": "python benchmarks/latency_model_fit.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "models": [],
    }
    lines = [
        "# Latency model: fitted in ms vs relative to the same run's dense model (leave-one-out)",
        "",
        f"Command: `{result['command']}`",
        "",
        "| model | samples | fit | all samples: mean / max abs error, within 10% | search samples: mean / max, within 10% |",
        "|---|---|---|---|---|",
    ]
    for item in a.inputs:
        name, path = item.split("=", 1)
        d = json.loads(Path(path).read_text())
        graph = ChannelGraph(
            create_model(name, num_classes=10, width=1.0).eval(), torch.zeros(2, *d["key"]["input_shape"])
        )
        sources = [s["source"] for s in d["samples"]]
        rec = {"model": name, "samples": len(sources), "key": d["key"]}
        for fit, samples in (
            ("ms", [{k: v for k, v in s.items() if k != "dense_ms"} for s in d["samples"]]),
            ("relative", d["samples"]),
        ):
            lm = L.LatencyModel(d["key"], samples, d.get("pad", 16))
            if fit == "relative" and not lm.relative:
                raise SystemExit(f"{path}: some samples have no same-run dense reading (dense_ms)")
            errs = lm.loo_errors(graph)
            rec[fit] = {"all": summary(errs, sources), "search": summary(errs, sources, "search"), "errors": errs}
            al, se = rec[fit]["all"], rec[fit]["search"]
            lines.append(
                f"| {name} | {len(sources)} | {fit} | {al['mean_abs']:.3f} / {al['max_abs']:.3f}, {al['within_10pct']} of {al['n']} | "
                f"{se['mean_abs']:.3f} / {se['max_abs']:.3f}, {se['within_10pct']} of {se['n']} |"
            )
        result["models"].append(rec)
    out = Path(a.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
