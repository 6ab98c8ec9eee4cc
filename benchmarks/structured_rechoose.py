"""Re-run the adapted-BN ranking of a ``benchmarks/structured.py --select adapted_bn`` result and apply
:func:`pqd.structured.select.choose` to it: which recipe each budget gets under the current rule.

    python benchmarks/structured_rechoose.py runs/structured_abn/structured.json --cache-dir CACHE

The ranking is rebuilt exactly as the benchmark built it (the cached teacher, the same 512
calibration and 1,000 held-out images), from the candidates' widths stored in the result; their
top-1 must equal the stored scores (the script stops if not). Prints and writes, per budget,
every candidate's proxy top-1, the paired test of the best against uniform, and the choice;
no latency is measured and nothing is trained. Writes ``--out`` (default: next to the input,
``*_rechoose.json``).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from bench_common import bench_ranker

from pqd.compress.channels.graph import ChannelGraph
from pqd.compress.channels.importance import group_scores
from pqd.config import DataConfig
from pqd.data import load_data
from pqd.models.registry import create_model
from pqd.structured.select import choose
from pqd.train.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("result", type=Path)
    p.add_argument(
        "--cache-dir", required=True, help="the --cache-dir of the benchmark run (its teacher is cached there)"
    )
    p.add_argument("--data", default=None, help="default: the run's --data")
    p.add_argument("--alpha", type=float, default=0.05)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    res = json.loads(a.result.read_text())
    args = argparse.Namespace(**res["args"])
    if a.data:
        args.data = a.data
    torch.set_num_threads(args.threads_train)
    data = load_data(DataConfig(dataset="cifar10", root=args.data, train_subset=args.train_subset, test_subset=10))
    out = {
        "command": "python benchmarks/structured_rechoose.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "alpha": a.alpha,
        "models": [],
    }
    for m in res["models"]:
        name = m["model"]
        teacher = create_model(
            name, num_classes=data.num_classes, **({"width": args.width} if args.width != 1.0 else {})
        )
        cached = (
            Path(a.cache_dir)
            / f"teacher_{name}_w{args.width}_n{args.train_subset}_e{args.teacher_epochs}_lr{args.teacher_lr:g}.safetensors"
        )
        teacher.load_state_dict(load_checkpoint(cached)[0])
        teacher.eval()
        example = torch.zeros(2, *data.image_shape)
        scores = group_scores(ChannelGraph(copy.deepcopy(teacher), example), "l1")
        rank = bench_ranker(teacher, scores, example, data, args)
        rows = []
        for budget, s in m["searches"].items():
            cands = {c["recipe"]: c["widths"] for c in s["candidates"]}
            correct = rank(cands)
            for c in s["candidates"]:
                got = float(correct[c["recipe"]].float().mean())
                if abs(got - c["score"]) > 1e-9:
                    raise SystemExit(
                        f"budget {budget}, {c['recipe']}: top-1 {got} differs from the stored {c['score']}: not the same ranking"
                    )
            chosen, test = choose(correct, alpha=a.alpha)
            rows.append(
                {
                    "budget": float(budget),
                    "chosen_then": s["recipe"],
                    "chosen_now": chosen,
                    "test": test,
                    "scores": {n: float(c.float().mean()) for n, c in correct.items()},
                }
            )
            print(
                f"{name} @ {budget}: then {s['recipe']}, now {chosen}; "
                + (
                    f"best {test['best']} vs uniform {test['difference'] * 100:+.1f} pts, p = {test['p_value']:.3g}"
                    if test
                    else "uniform was the best"
                ),
                flush=True,
            )
        out["models"].append({"model": name, "budgets": rows})
    dest = a.out or a.result.with_name(a.result.stem + "_rechoose.json")
    dest.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
