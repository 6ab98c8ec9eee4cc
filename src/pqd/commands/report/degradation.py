"""Report section: accuracy degradation on contiguous slices of the test set.

Reads ``metrics.json["degradation"]`` (:func:`pqd.measure.degradation.compare_degradation`,
where the definitions live) from each run's stored metrics and lists, per configuration, the
degradation factor of the final model and of its teacher, the worst paired slice, and the
``slice_failure`` flag: mean accuracy kept, but significantly worse than the teacher on a slice.
"""

from __future__ import annotations

import json
import statistics
from typing import Any

__all__ = ["degradation_rows", "degradation_section"]


def _metrics(run_row: dict) -> dict:
    return json.loads(run_row.get("metrics_json") or "{}")


def degradation_rows(aggs: list[dict]) -> list[dict[str, Any]]:
    """One record per configuration that has degradation data (runs without it are skipped)."""
    out = []
    for a in aggs:
        if a.get("kind") == "teacher":
            continue
        recs = [d for d in (_metrics(r).get("degradation") for r in a["runs"]) if d]
        if not recs:
            continue
        worst = [d["worst_slice"] for d in recs if d.get("worst_slice")]
        out.append(
            {
                "label": a["label"],
                "stages": a["stages"],
                "n": len(recs),
                "df": statistics.fmean(d["degradation_factor"] for d in recs),
                "teacher_df": statistics.fmean(d["teacher_degradation_factor"] for d in recs),
                "mean_gap": statistics.fmean(d["mean_gap"] for d in recs),
                "worst_gap": max((w["gap"] for w in worst), default=None),
                "worst_p": min((w["p_adjusted"] for w in worst), default=None),
                "min_slice": recs[0].get("min_slice"),
                "flagged": sum(bool(d.get("slice_failure")) for d in recs),
            }
        )
    return out


def degradation_section(doc: Any, aggs: list[dict]) -> None:
    """Append the section to ``doc`` (the report's document: ``h``, ``p``, ``table``)."""
    rows = degradation_rows(aggs)
    if not rows:
        return
    doc.h(3, "Degradation on contiguous test slices")
    doc.p(
        f"The test set, in its fixed order, is cut into 1, 2, 4, ... contiguous slices down to about {rows[0]['min_slice']} "
        "images each. **DF** (degradation factor) = 1 - worst slice accuracy / whole-set accuracy (0 = uniform). "
        "**worst gap** = the largest teacher-minus-final accuracy gap on one slice (paired, same images), with McNemar's p "
        "Bonferroni-adjusted over all slices. **flag**: runs that keep the mean (gap ≤ 1 point) but lose ≥ 5 points "
        "on a slice with adjusted p < 0.05. Means over seeds."
    )
    doc.table(
        [
            "configuration",
            "stages",
            "n",
            "DF",
            "teacher DF",
            "mean gap (pts)",
            "worst slice gap (pts)",
            "adj. p",
            "flag",
        ],
        [
            [
                r["label"],
                r["stages"] or "dense",
                r["n"],
                f"{r['df']:.3f}",
                f"{r['teacher_df']:.3f}",
                f"{100 * r['mean_gap']:.2f}",
                "-" if r["worst_gap"] is None else f"{100 * r['worst_gap']:.1f}",
                "-" if r["worst_p"] is None else f"{r['worst_p']:.3g}",
                f"**{r['flagged']}/{r['n']} flagged**" if r["flagged"] else "",
            ]
            for r in rows
        ],
    )
