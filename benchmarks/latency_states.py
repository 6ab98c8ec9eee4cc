"""Does a latency prediction hold when the machine changes state? Which reference makes it hold?

    python benchmarks/latency_states.py vgg16_bn=benchmarks/results/latency_samples_vgg16_bn.json \
        --runs-per-set 100 --sets 12 --out benchmarks/results/latency_states_vgg16_bn

On the project's machine (a 2-vCPU KVM guest) the same INT8 models read in two states that last
seconds to minutes (benchmarks/latency_spread.py): in the slow one every call costs a roughly fixed
extra time per layer, so a small pruned model slows by a larger *share* than the dense one, and a
ratio to dense measured in one state misses one measured in the other by more than 10%.

This script takes the width configurations of a committed latency-sample file, exports each (and
the dense model, and the *floor* model: every group at the rounding minimum, the same layers
with almost no work) once, and times all of them together in ``--sets`` runs of fresh worker
processes. Then it asks, by leave-one-configuration-out over every (configuration, run): how well
do fits on the latency model's features predict each measurement, when the run's references are
known?

- ``ms``: milliseconds, no reference;
- ``relative``: latency / the same run's dense reading (pqd's fit before this script);
- ``anchored``: (latency - floor) / (dense - floor) of the same run: the floor model carries the
  run's fixed per-layer cost, the dense model its speed; a prediction is floor + fit x (dense - floor)
  (what pqd's latency model does since this script).

The fits are pqd's own :class:`~pqd.structured.latency_model.LatencyModel`, given the readings each
kind keeps. ``--refit OLD.json`` recomputes the table from a previous run's readings without timing.

Errors are of milliseconds (predicted vs measured, in the run's state) and are reported per
state (runs split at the median floor reading).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pqd.compress.channels.graph import ChannelGraph, prune_to_widths
from pqd.compress.channels.importance import group_scores
from pqd.measure.latency import interleave
from pqd.measure.workers import start_workers
from pqd.models.registry import create_model
from pqd.structured import latency_model as L

ROOT = Path(__file__).resolve().parents[1]

FITS = ("ms", "relative", "anchored")
FLOOR_ROUND_TO = 8  # the floor model: every group at 8 channels, as pqd's default round_to


def fit_predict(kind: str, graph, named: dict, sets: list[dict], rows: list[tuple], train: np.ndarray) -> np.ndarray:
    """Fit pqd's latency model (:class:`pqd.structured.latency_model.LatencyModel`) on rows ``train``, given
    the reference readings ``kind`` keeps, and predict every row's ms in its own run's readings."""

    def sample(c, r):
        s = {"widths": named[c], "ms": sets[r][c], "source": f"run {r}"}
        if kind != "ms":
            s["dense_ms"] = sets[r]["dense"]
        if kind == "anchored":
            s["floor_ms"], s["floor_round_to"] = sets[r]["floor"], FLOOR_ROUND_TO
        return s

    lm = L.LatencyModel(key={}, samples=[sample(c, r) for (c, r), t in zip(rows, train, strict=True) if t]).fit(graph)
    assert lm.fit_kind == kind
    return np.array(
        [lm.predict_in_run(graph, named[c], dense_ms=sets[r]["dense"], floor_ms=sets[r]["floor"]) for c, r in rows]
    )


def time_sets(dense, named: dict, scores, example, target, a) -> list[dict]:
    """``a.sets`` runs, each in fresh worker processes, of every model in ``named`` (exported once)."""
    models = {k: prune_to_widths(dense, w, example=example, round_to=1, scores=scores) for k, w in named.items()}
    sets, t0 = [], time.time()
    with tempfile.TemporaryDirectory(prefix="pqd_states_") as tmp:
        specs = {}
        for i, (k, m) in enumerate(models.items()):
            specs[k] = L.export_int8(m, example, target.runtime, Path(tmp) / f"m{i}") | {
                "threads": target.threads,
                "input_shape": [3, 32, 32],
                "batch_sizes": [target.batch],
                "seed": 0,
            }
        for r in range(a.sets):
            with start_workers(specs) as workers:
                recs = interleave(
                    workers,
                    batch_sizes=(target.batch,),
                    threads=target.threads,
                    warmup=10,
                    runs=a.runs_per_set,
                    large_batch_runs=3,
                )
            sets.append({rec["model"]: rec["median_ms"] for rec in recs} | {"t": time.time() - t0})
            print(a.out, r, {k: round(v, 3) for k, v in sets[-1].items()}, flush=True)
    return sets


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", help="MODEL=latency_samples.json")
    ap.add_argument("--sets", type=int, default=12, help="runs, each in fresh worker processes")
    ap.add_argument("--runs-per-set", type=int, default=100)
    ap.add_argument("--max-configs", type=int, default=12)
    ap.add_argument("--refit", help="a previous run's JSON: recompute the fits from its readings, time nothing")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    old = json.loads(Path(a.refit).read_text())["models"] if a.refit else {}
    out = {
        "command": " ".join(sys.argv),
        "env": {
            "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "models": {},
    }
    lines = ["# Latency predictions across machine states", "", f"`{out['command']}`", ""]
    for spec in a.files:
        name, path = spec.split("=", 1)
        data = json.loads(Path(path).read_text())
        target = L.Target(data["key"]["runtime"], data["key"]["batch"], data["key"]["threads"])
        torch.set_num_threads(target.threads)
        torch.manual_seed(0)
        dense = create_model(name, num_classes=10).eval()
        example = torch.zeros(2, 3, 32, 32)
        graph = ChannelGraph(copy.deepcopy(dense), example)
        scores = group_scores(graph, "l1")
        seen, configs = set(), []
        for s in data["samples"]:
            key = tuple(sorted(s["widths"].items()))
            if key not in seen and s["widths"] != graph.widths():
                seen.add(key)
                configs.append(s["widths"])
        configs = configs[: a.max_configs]
        floor_w = L.floor_widths(graph, FLOOR_ROUND_TO)
        named = {"dense": graph.widths(), "floor": floor_w} | {f"c{i}": w for i, w in enumerate(configs)}
        if name in old:  # the readings of a previous run (same configurations: the same sample file)
            assert old[name]["configs"] == named, "--refit needs the run's own sample file and --max-configs"
            sets, t0 = old[name]["sets"], time.time() - old[name]["seconds"]
        else:
            sets, t0 = time_sets(dense, named, scores, example, target, a), time.time()
        cfg = [k for k in named if k.startswith("c")]
        rows = [(c, r) for r in range(len(sets)) for c in cfg]
        ms = np.array([sets[r][c] for c, r in rows])
        floor_med = statistics.median(s["floor"] for s in sets)
        slow = np.array([sets[r]["floor"] > floor_med for _, r in rows])
        res = {}
        for kind in FITS:
            err = np.zeros(len(rows))
            for c in cfg:
                test = np.array([cc == c for cc, _ in rows])
                pred = fit_predict(kind, graph, named, sets, rows, ~test)
                err[test] = (pred[test] - ms[test]) / ms[test]
            res[kind] = {
                "errors": err.tolist(),
                "all": {
                    "mean_abs": float(np.abs(err).mean()),
                    "max_abs": float(np.abs(err).max()),
                    "within_10": int((np.abs(err) <= 0.10).sum()),
                    "n": len(err),
                },
                "slow": {
                    "mean_abs": float(np.abs(err[slow]).mean()) if slow.any() else None,
                    "within_10": int((np.abs(err[slow]) <= 0.10).sum()),
                    "n": int(slow.sum()),
                },
                "fast": {
                    "mean_abs": float(np.abs(err[~slow]).mean()) if (~slow).any() else None,
                    "within_10": int((np.abs(err[~slow]) <= 0.10).sum()),
                    "n": int((~slow).sum()),
                },
            }
        out["models"][name] = {
            "configs": named,
            "sets": sets,
            "rows": rows,
            "fits": res,
            "seconds": time.time() - t0,
            "target": vars(target),
        }
        fl_all = [s["floor"] for s in sets]
        dn_all = [s["dense"] for s in sets]
        lines += [
            f"## {name}: {len(cfg)} configurations x {len(sets)} runs ({out['models'][name]['seconds']:.0f} s)",
            "",
            f"Floor model {min(fl_all):.3f}-{max(fl_all):.3f} ms, dense {min(dn_all):.3f}-{max(dn_all):.3f} ms across runs; "
            f"runs split at the median floor reading ({floor_med:.3f} ms) into fast and slow.",
            "",
            "| fit | mean abs error | max abs error | within 10% (all) | within 10% (fast runs) | within 10% (slow runs) |",
            "|---|---|---|---|---|---|",
        ]
        for kind in FITS:
            s = res[kind]
            lines.append(
                f"| {kind} | {s['all']['mean_abs']:.1%} | {s['all']['max_abs']:.1%} | {s['all']['within_10']} of {s['all']['n']} | "
                f"{s['fast']['within_10']} of {s['fast']['n']} | {s['slow']['within_10']} of {s['slow']['n']} |"
            )
        lines.append("")
    stem = Path(a.out)
    stem.with_suffix(".json").write_text(json.dumps(out, indent=1, default=str))
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
