"""What post-training quantization itself costs in the evidence studies: each PTQ model (pqd's static
PTQ and NNCF's) against its own FP32 teacher, paired on the same test images, pooled over seeds.

    python benchmarks/ptq_cost.py runs/evidence10 runs/evidence100 --out benchmarks/results/evidence_ptq_cost

Reads the per-image predictions the sweep keeps: ``ptq*`` runs hold their teacher's predictions
(``teacher_predictions.npy``); an ``nncf_ptq*`` run shares the teacher of the ``ptq*`` run of the same
seed and budget. McNemar's test on the discordant images summed over seeds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from pqd.measure.stats import mcnemar  # noqa: E402

VARIANTS = ("ptq", "nncf_ptq", "ptq_long", "nncf_ptq_long")


def _labels(p: np.ndarray) -> np.ndarray:
    return p.argmax(1) if p.ndim > 1 else p


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("studies", nargs="+")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "evidence_ptq_cost"))
    a = ap.parse_args(argv)
    rows = []
    for study in a.studies:
        for v in VARIANTS:
            b = c = n = right = teacher_right = 0
            seeds = []
            for s in a.seeds:
                run, twin = Path(study) / "runs" / f"{v}__seed{s}", Path(study) / "runs" / f"{v.replace('nncf_', '')}__seed{s}"
                pred = run / ("nncf_int8_predictions.npy" if v.startswith("nncf") else "predictions.npy")
                if not pred.exists():
                    continue
                y = np.load(twin / "test_labels.npy")
                q, t = _labels(np.load(pred)) == y, _labels(np.load(twin / "teacher_predictions.npy")) == y
                b += int((q & ~t).sum())
                c += int((~q & t).sum())
                n, right, teacher_right = n + len(y), right + int(q.sum()), teacher_right + int(t.sum())
                seeds.append(s)
            if not seeds:
                continue
            rows.append({"study": study, "variant": v, "seeds": seeds, "n": n, "int8_top1": right / n, "teacher_top1": teacher_right / n,
                         "difference": (right - teacher_right) / n, "b": b, "c": c, "p_value": mcnemar(b, c)["p_value"]})
    out = Path(a.out)
    out.with_suffix(".json").write_text(json.dumps({"command": "python benchmarks/ptq_cost.py " + " ".join(argv or sys.argv[1:]),
                                                    "rows": rows}, indent=1))
    lines = ["# What PTQ itself costs: INT8 vs its own FP32 teacher (paired, pooled over seeds)", "",
             "| study | variant | seeds | INT8 top-1 % | teacher top-1 % | INT8 − teacher, pts | b / c | McNemar p |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['study']} | {r['variant']} | {','.join(map(str, r['seeds']))} | {100 * r['int8_top1']:.2f} | {100 * r['teacher_top1']:.2f} | "
              f"{100 * r['difference']:+.2f} | {r['b']} / {r['c']} | {r['p_value']:.3g} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
