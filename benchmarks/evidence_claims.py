"""The P→Q→D claims of docs/RESULTS.md, decided from an evidence sweep's per-image predictions.

    python benchmarks/evidence_claims.py runs/evidence10 --out benchmarks/results/evidence10_claims

For each claim (docs/RESULTS_TEMPLATE.md states the rows and the rule beforehand), every
comparison "A beats B" pools the seeds both ran on the same test images: the difference in
top-1 points with its 95% paired interval (Wald, over the pooled images), McNemar's test on
the discordant images summed over seeds (the stratified form), how many seeds point each way,
and Holm-adjusted p within the claim. Verdict per comparison (α = 0.05 after Holm):

* **holds**: difference > 0, p < α, and no seed points the other way;
* **does not hold**: difference < 0 with p < α, or the interval's upper end is below +0.5 points;
* **not resolved at this scale**: anything else.

Latency rows (batch-1 median ratio final / teacher, both timed interleaved in one run, and the
runtimes they ran in) are listed for the configurations named in the speed claims.
Writes ``--out``.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from bench_common import paired_comparison, verdict

from pqd.commands.report.build import aggregate
from pqd.commands.sweep import read_table
from pqd.measure.stats import holm, wilson_interval
from pqd.run.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]


def _vs(a: str, bs: list[str]) -> list[tuple[str, str]]:
    return [(a, b) for b in bs]


# section -> [(A, B), ...] comparisons "A beats B"; labels are the sweep's configuration labels
CLAIMS = {
    "3a. P→Q→D beats single techniques (shorter budgets)": _vs(
        "PQD", ["ptq", "qat_only", "prune_only", "kd_only", "pq_nokd", "dense"]
    ),
    "3b. P→Q→D beats equal-budget controls (13 epochs)": _vs("PQD", ["long_teacher", "ptq_long", "qat_long", "pq_ce4"]),
    "3c. P→Q→D beats the peer PTQ (NNCF)": _vs("PQD", ["nncf_ptq", "nncf_ptq_long"]),
    "4. P→Q→D is the best of the 6 orders": _vs("PQD", ["PDQ", "QPD", "QDP", "DPQ", "DQP"]),
    "5a. KD last recovers accuracy: P→Q→D vs the same stages with the KD term off": _vs("PQD", ["PQD_kdoff"]),
    "5b. KD last vs its epochs spent on more QAT (equal budget) and vs no KD stage": _vs("PQD", ["pq_ce4", "pq_nokd"]),
    "5c. KD alone vs the same fine-tuning without the teacher": _vs("kd_only", ["ft_ce2"]),
    # not a claim of the paper: what post-training quantization itself costs, each PTQ model against its own teacher
    "PTQ vs its own FP32 teacher (what PTQ costs; a control)": [
        ("ptq", "dense"),
        ("nncf_ptq", "dense"),
        ("ptq_long", "long_teacher"),
        ("nncf_ptq_long", "long_teacher"),
    ],
}
SPEED = ["dense", "PQD", "qat_only", "ptq", "prune_only", "kd_only", "sparsity__sparsity0.0", "nncf_ptq"]


def correctness(sweep: Path, aggs: list[dict]) -> dict[str, dict[int, np.ndarray]]:
    """label -> seed -> per-image correctness (the deployed model's predictions vs the test labels)."""
    out: dict[str, dict[int, np.ndarray]] = {}
    teacher_dirs = {r.get("teacher_id"): r["run_dir"] for a in aggs for r in a["runs"] if r["kind"] == "teacher"}
    for a in aggs:
        for r in a["runs"]:
            run = RunDir(sweep / r["run_dir"])
            name = None
            if r["kind"] == "peer":
                name = (json.loads(r.get("metrics_json") or "{}").get("accuracy") or {}).get("predictions_file")
            pred = run.load_predictions(name=name) if (name or r["kind"] != "peer") else None
            labels = run.load_predictions(labels=True)
            if labels is None and r.get("teacher_id") in teacher_dirs:  # a peer run: its teacher's test labels
                labels = RunDir(sweep / teacher_dirs[r["teacher_id"]]).load_predictions(labels=True)
            if pred is None or labels is None or len(pred) != len(labels):
                continue
            out.setdefault(a["label"], {})[r["seed"]] = pred == labels
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep")
    ap.add_argument("--out", default=None, help="path without suffix (default: SWEEP/claims)")
    a = ap.parse_args(argv)
    sweep = Path(a.sweep)
    rows = read_table(sweep)
    aggs = aggregate(rows)
    corr = correctness(sweep, aggs)
    by_label = {g["label"]: g for g in aggs}
    result = {
        "sweep": str(sweep),
        "command": "python benchmarks/evidence_claims.py " + " ".join(argv or sys.argv[1:]),
        "configs": {},
        "claims": {},
        "latency": [],
    }
    for g in aggs:
        ci = None
        if g["label"] in corr:
            k = sum(int(v.sum()) for v in corr[g["label"]].values())
            n = sum(len(v) for v in corr[g["label"]].values())
            ci = [k / n, *wilson_interval(k, n), n]
        result["configs"][g["label"]] = {
            "stages": g["stages"],
            "n_seeds": g["n"],
            "top1_mean": g["acc"],
            "top1_sd": g["acc_sd"],
            "pooled_top1_ci_n": ci,
            "rel_lat_b1": g["rel_lat"],
            "rel_lat_b1_sd": g["rel_lat_sd"],
            "lat_sides": g["lat_sides"],
            "size_mb": g["size_mb"],
        }
    for claim, pairs in CLAIMS.items():
        recs = []
        for lab_a, lab_b in pairs:
            if lab_a in corr and lab_b in corr:
                rec = paired_comparison(corr[lab_a], corr[lab_b])
                if rec:
                    recs.append(rec | {"a": lab_a, "b_label": lab_b})
        for rec, adj in zip(recs, holm([r["p"] for r in recs]), strict=True):
            rec["p_holm"] = adj
            rec["verdict"] = verdict(rec["difference"], adj, rec["ci"][1], rec["seeds_b_better"])
        result["claims"][claim] = recs
    for lab in SPEED:
        if lab in by_label:
            g = by_label[lab]
            result["latency"].append(
                {
                    "label": lab,
                    "stages": g["stages"],
                    "rel_lat_b1": g["rel_lat"],
                    "sd": g["rel_lat_sd"],
                    "sides": g["lat_sides"],
                    "lat_ms": g["lat_ms"],
                }
            )
    out = Path(a.out) if a.out else sweep / "claims"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
    out.with_suffix(".md").write_text(to_markdown(result))
    print(to_markdown(result))
    return 0


def _f(v, fmt=".2f"):
    return "–" if v is None else format(v, fmt)


def to_markdown(r: dict) -> str:
    lines = [
        f"# Evidence claims: {r['sweep']}",
        "",
        f"Command: `{r['command']}`",
        "",
        "## Configurations (top-1 pooled over seeds on the full test split, Wilson 95% interval)",
        "",
        "| configuration | stages | seeds | top-1 % mean ± sd | pooled top-1 % [95% CI] | rel. latency b1 (final / teacher) | sides | size MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for lab, c in r["configs"].items():
        ci = c["pooled_top1_ci_n"]
        pooled = f"{100 * ci[0]:.2f} [{100 * ci[1]:.2f}, {100 * ci[2]:.2f}] (n={ci[3]})" if ci else "–"
        lines.append(
            f"| {lab} | {c['stages'] or 'dense'} | {c['n_seeds']} | {_f(c['top1_mean'])} ± {_f(c['top1_sd'])} | {pooled} | "
            f"{_f(c['rel_lat_b1'], '.3f')} | {c['lat_sides']} | {_f(c['size_mb'], '.3f')} |"
        )
    for claim, recs in r["claims"].items():
        lines += [
            "",
            f"## {claim}",
            "",
            "| A | B | seeds | top-1 A % | top-1 B % | A − B (pts) [95% CI] | b / c | seeds A/B better | p | p (Holm, this claim) | verdict |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for x in recs:
            lines.append(
                f"| {x['a']} | {x['b_label']} | {','.join(map(str, x['seeds']))} | {100 * x['top1_a']:.2f} | {100 * x['top1_b']:.2f} | "
                f"{100 * x['difference']:+.2f} [{100 * x['ci'][0]:+.2f}, {100 * x['ci'][1]:+.2f}] | {x['b']} / {x['c']} | "
                f"{x['seeds_a_better']}/{x['seeds_b_better']} | {x['p']:.3g} | {x['p_holm']:.3g} | **{x['verdict']}** |"
            )
        if not recs:
            lines.append("| (no runs with predictions for this claim) | | | | | | | | | | |")
    lines += [
        "",
        "## Latency (batch-1 median, final / teacher, timed interleaved in one run)",
        "",
        "| configuration | stages | final ms | ratio | sides |",
        "|---|---|---|---|---|",
    ]
    for x in r["latency"]:
        lines.append(
            f"| {x['label']} | {x['stages'] or 'dense'} | {_f(x['lat_ms'], '.3f')} | {_f(x['rel_lat_b1'], '.3f')} ± {_f(x['sd'], '.3f')} | {x['sides']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
