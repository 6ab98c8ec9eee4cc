"""CPU-scale study of the literature's variants against pqd's own stages, at equal epochs.

    python benchmarks/variants_study.py            # full: width 0.25, 3 seeds (long)
    python benchmarks/variants_study.py --quick    # smoke scale: width 0.125, 1 seed

Dataset: scikit-learn digits (offline; 1437 train / 360 test images, CIFAR-shaped). One dense
teacher per seed (trained once, shared through ``teacher.weights``), then the groups below,
every run a normal pqd run (``run_pipeline``) in ``--work`` (default: a temporary folder):

* **pruning** - lottery-ticket IMP (``L:E``, rounds R, fraction f with 1-(1-f)^R = s, late
  rewind to epoch 1) vs AGP (``P:E`` gradual) vs one-shot (``P:E`` oneshot), all to sparsity s
  in E epochs;
* **joint** - sequential ``P:a,Q:b,D:c`` vs joint ``J:a+b+c`` at the same target sparsity, both
  with ``quantize.freeze_fraction: 0`` (see the comment in :func:`groups`);
* **kd** - a one-shot-pruned student (``P:0`` at high sparsity) recovered by ``D:E`` with
  ``distill.kind`` response vs feature (vs attention);
* **quant** - PTQ weight options at no training: per-channel/per-tensor x symmetric/affine,
  and dynamic (Linear-only) PTQ; accuracy and batch-1 latency.

Statistics (claim by claim, against each group's first variant): each run's deployed model is
reloaded and predicts the test set; accuracy difference with a 95% paired bootstrap interval
over test images (pooled over seeds; 2,000 resamples), and McNemar's test on the pooled
discordant images. A claim is "resolved" when the interval excludes 0; otherwise the table says
"not resolved at this scale". Latency: batch-1 median of pqd's worker harness, relative to the
teacher timed interleaved in the same run. Writes ``--out``.json / .md (default
benchmarks/results/variants).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from pqd.measure import predict
from pqd.measure.faithfulness import mcnemar
from pqd.run.config import RunConfig
from pqd.run.loader import load_run
from pqd.run.pipeline import run_pipeline
from pqd.run.rundir import RunDir


def scale(quick: bool) -> dict:
    if quick:
        return {
            "width": 0.125,
            "seeds": [0],
            "teacher_epochs": 3,
            "E": 3,
            "rounds": 2,
            "fraction": 0.5,
            "seq": (1, 1, 1),
            "kd_epochs": 2,
            "kd_sparsity": 0.9,
            "train_subset": None,
            "runs": 10,
            "warmup": 2,
        }
    return {
        "width": 0.25,
        "seeds": [0, 1, 2],
        "teacher_epochs": 15,
        "E": 12,
        "rounds": 2,
        "fraction": 0.5,
        "seq": (4, 4, 4),
        "kd_epochs": 6,
        "kd_sparsity": 0.9,
        "train_subset": None,
        "runs": 100,
        "warmup": 10,
    }


def groups(s: dict) -> dict[str, list[tuple[str, dict]]]:
    target = 1.0 - (1.0 - s["fraction"]) ** s["rounds"]
    E, (a, b, c) = s["E"], s["seq"]
    return {
        "pruning": [
            ("agp", {"stages": f"P:{E}", "prune": {"sparsity": target, "schedule": "gradual"}}),
            ("imp", {"stages": f"L:{E}", "imp": {"rounds": s["rounds"], "fraction": s["fraction"], "rewind": 1}}),
            ("oneshot", {"stages": f"P:{E}", "prune": {"sparsity": target, "schedule": "oneshot"}}),
        ],
        # quantize.freeze_fraction 0 for both: training a fake-quant student with KD after its BN statistics
        # are frozen diverges (seen in pqd 115cf68 for 'Q:1,D:3' as for 'J:3'); a 1-epoch stage never freezes,
        # so the default would freeze J's last epochs but not D:1's and compare the freeze, not the order.
        "joint": [
            (
                "sequential_PQD",
                {"stages": f"P:{a},Q:{b},D:{c}", "prune": {"sparsity": target}, "quantize": {"freeze_fraction": 0.0}},
            ),
            (
                "joint_J",
                {"stages": f"J:{a + b + c}", "joint": {"sparsity": target}, "quantize": {"freeze_fraction": 0.0}},
            ),
        ],
        "kd": [
            (
                "kd_response",
                {
                    "stages": f"P:0,D:{s['kd_epochs']}",
                    "prune": {"sparsity": s["kd_sparsity"], "schedule": "oneshot"},
                    "distill": {"kind": "response"},
                },
            ),
            (
                "kd_feature",
                {
                    "stages": f"P:0,D:{s['kd_epochs']}",
                    "prune": {"sparsity": s["kd_sparsity"], "schedule": "oneshot"},
                    "distill": {"kind": "feature"},
                },
            ),
            (
                "kd_attention",
                {
                    "stages": f"P:0,D:{s['kd_epochs']}",
                    "prune": {"sparsity": s["kd_sparsity"], "schedule": "oneshot"},
                    "distill": {"kind": "attention"},
                },
            ),
        ],
        "quant": [
            ("ptq_per_channel_sym", {"stages": "Q:0", "quantize": {"mode": "ptq"}}),
            ("ptq_per_tensor_sym", {"stages": "Q:0", "quantize": {"mode": "ptq", "granularity": "per_tensor"}}),
            ("ptq_per_channel_affine", {"stages": "Q:0", "quantize": {"mode": "ptq", "symmetric": False}}),
            (
                "ptq_per_tensor_affine",
                {"stages": "Q:0", "quantize": {"mode": "ptq", "granularity": "per_tensor", "symmetric": False}},
            ),
            ("dynamic_linear", {"stages": "Q:0", "quantize": {"mode": "dynamic"}}),
        ],
    }


def base_config(s: dict, seed: int, threads: int) -> dict:
    return {
        "seed": seed,
        "model": {"name": "resnet18", "width": s["width"]},
        "data": {"dataset": "digits", "train_subset": s["train_subset"]},
        "train": {"batch_size": 64, "progress": False, "threads": threads},
        "teacher": {"epochs": s["teacher_epochs"], "lr": 0.05},
        "measure": {"threads": 1, "warmup": s["warmup"], "runs": s["runs"], "batch_sizes": [1], "large_batch_runs": 2},
    }


def merge(a: dict, b: dict) -> dict:
    out = json.loads(json.dumps(a))
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (c - h, c + h)


def paired(ref: torch.Tensor, other: torch.Tensor, *, resamples: int = 2000, seed: int = 0) -> dict:
    """Accuracy difference other - ref on the same images: point, 95% bootstrap interval, McNemar."""
    diff = other.float() - ref.float()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(diff), (resamples, len(diff)), generator=g)
    boot = diff[idx].mean(1).sort().values
    lo, hi = boot[int(0.025 * resamples)].item(), boot[int(0.975 * resamples) - 1].item()
    test = mcnemar(int(((ref == 1) & (other == 0)).sum()), int(((ref == 0) & (other == 1)).sum()))
    return {
        "diff": diff.mean().item(),
        "ci95": [lo, hi],
        "mcnemar_p": test["p_value"],
        "n_images": len(diff),
        "resolved": lo > 0 or hi < 0,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke scale: width 0.125, 1 seed, 3-epoch budgets")
    ap.add_argument(
        "--groups", default="pruning,joint,kd,quant", help="comma-separated subset of pruning,joint,kd,quant"
    )
    ap.add_argument("--work", default=None, help="folder for the runs (kept; default: a temporary folder, removed)")
    ap.add_argument("--out", default="benchmarks/results/variants", help="output path without suffix")
    ap.add_argument("--threads", type=int, default=2, help="training threads")
    ap.add_argument("--seeds", type=int, nargs="+", help="override the scale's seeds (full: 0 1 2)")
    args = ap.parse_args(argv)
    s = scale(args.quick)
    if args.seeds:
        s["seeds"] = list(args.seeds)
    chosen = [g.strip() for g in args.groups.split(",") if g.strip()]
    plan = {g: v for g, v in groups(s).items() if g in chosen}
    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="pqd-variants-")
    work = Path(args.work or tmp.name)
    t0 = time.time()
    runs: list[dict] = []
    correct: dict[tuple[str, str, int], torch.Tensor] = {}
    for seed in s["seeds"]:
        base = base_config(s, seed, args.threads)
        teacher_dir = work / f"teacher_s{seed}"
        run_pipeline(RunConfig.from_dict(base | {"stages": ""}), teacher_dir)
        base["teacher"]["weights"] = str(teacher_dir / RunDir(teacher_dir).teacher_path.name)
        for group, variants in plan.items():
            for name, over in variants:
                out = work / f"{group}__{name}__s{seed}"
                print(f"[{time.time() - t0:6.0f}s] {group}/{name} seed {seed}", file=sys.stderr, flush=True)
                m = run_pipeline(RunConfig.from_dict(merge(base, over)), out)
                loaded = load_run(out)
                logits = predict(loaded.deployed, loaded.data.test, mean=loaded.data.mean, std=loaded.data.std)
                ok = (logits.argmax(1) == loaded.data.test.y).to(torch.int64)
                correct[(group, name, seed)] = ok
                b1 = {r["model"]: r["median_ms"] for r in m["latency"] if r["batch"] == 1}
                deg = m.get("degradation") or {}
                runs.append(
                    {
                        "group": group,
                        "variant": name,
                        "seed": seed,
                        "stages": m["stages"],
                        "top1": m["accuracy"]["final_top1"],
                        "teacher_top1": m["accuracy"]["teacher_top1"],
                        "sparsity_target": m["sparsity"]["target"],
                        "sparsity_achieved": m["sparsity"]["achieved"],
                        "sparsity_int8": m["sparsity"].get("achieved_int8"),
                        "b1_ms": b1.get(f"final_{m['final_form']}"),
                        "teacher_b1_ms": b1.get("teacher_fp32"),
                        "size_bytes": m["size_bytes"]["final"],
                        "compact_bytes": m["size_bytes"].get("compact_int8"),
                        "degradation_factor": deg.get("degradation_factor"),
                        "slice_failure": deg.get("slice_failure"),
                        "wall_s": m.get("wall_time_s"),
                    }
                )
    summary, claims = [], []
    for group, variants in plan.items():
        ref = variants[0][0]
        for name, _ in variants:
            rs = [r for r in runs if r["group"] == group and r["variant"] == name]
            oks = torch.cat([correct[(group, name, sd)] for sd in s["seeds"]])
            lo, hi = wilson(int(oks.sum()), len(oks))
            rel = [r["b1_ms"] / r["teacher_b1_ms"] for r in rs if r["b1_ms"] and r["teacher_b1_ms"]]
            summary.append(
                {
                    "group": group,
                    "variant": name,
                    "stages": rs[0]["stages"],
                    "seeds": len(rs),
                    "top1": oks.float().mean().item(),
                    "top1_ci95": [lo, hi],
                    "sparsity_achieved": sum(r["sparsity_achieved"] for r in rs) / len(rs),
                    "rel_b1_latency": sum(rel) / len(rel) if rel else None,
                    "compact_bytes": rs[0]["compact_bytes"],
                    "size_bytes": rs[0]["size_bytes"],
                    "degradation_factor": sum(r["degradation_factor"] or 0 for r in rs) / len(rs),
                    "slice_failures": sum(bool(r["slice_failure"]) for r in rs),
                }
            )
            if name != ref:
                refs = torch.cat([correct[(group, ref, sd)] for sd in s["seeds"]])
                claims.append({"group": group, "claim": f"{name} vs {ref}", **paired(refs, oks)})
    result = {
        "quick": args.quick,
        "scale": s,
        "torch": torch.__version__,
        "wall_s": round(time.time() - t0, 1),
        "command": "python benchmarks/variants_study.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "summary": summary,
        "claims": claims,
        "runs": runs,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    if tmp is not None:
        tmp.cleanup()
    return 0


def _pct(x):
    return "-" if x is None else f"{100 * x:.1f}"


def markdown(r: dict) -> str:
    s = r["scale"]
    lines = [
        f"# Variants study ({'QUICK smoke scale: not evidence' if r['quick'] else 'CPU scale'})",
        "",
        f"`{r['command']}` — digits, ResNet-18 width {s['width']}, seeds {s['seeds']}, teacher {s['teacher_epochs']} epochs, "
        f"torch {r['torch']}, {r['wall_s']:.0f} s. Accuracy of the deployed model on the 360 test images "
        "(pooled over seeds) with a 95% Wilson interval; latency = batch-1 median relative to the teacher timed "
        "interleaved in the same run (1 thread).",
        "",
        "| group | variant | stages | seeds | top-1 % [95% CI] | sparsity | rel. b1 latency | compact KB | DF | slice flags |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for x in r["summary"]:
        lo, hi = x["top1_ci95"]
        rel = "-" if x["rel_b1_latency"] is None else f"{x['rel_b1_latency']:.2f}"
        kb = "-" if not x["compact_bytes"] else f"{x['compact_bytes'] / 1e3:.1f}"
        lines.append(
            f"| {x['group']} | {x['variant']} | `{x['stages']}` | {x['seeds']} | {_pct(x['top1'])} [{_pct(lo)}, {_pct(hi)}] | "
            f"{x['sparsity_achieved']:.2f} | {rel} | {kb} | {x['degradation_factor']:.3f} | {x['slice_failures']} |"
        )
    lines += [
        "",
        "## Claims (paired, same test images, pooled over seeds)",
        "",
        "| group | claim | Δ top-1 (pts) | 95% bootstrap CI | McNemar p | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for c in r["claims"]:
        verdict = ("better" if c["diff"] > 0 else "worse") if c["resolved"] else "not resolved at this scale"
        lines.append(
            f"| {c['group']} | {c['claim']} | {100 * c['diff']:+.1f} | [{100 * c['ci95'][0]:+.1f}, {100 * c['ci95'][1]:+.1f}] | "
            f"{c['mcnemar_p']:.3g} | {verdict} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
