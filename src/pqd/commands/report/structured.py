"""Report section: structured pruning runs, their latency budgets, and the MACs proxy beside the stopwatch.

Reads the structured stage's search record (``stage_records`` in each run's metrics.json,
written by :func:`pqd.structured.search.search`): the budget, the latency the latency model
predicted, the INT8 latency measured on the target runtime with the dense model in the same
run, and the MACs of the chosen and the dense widths. Per configuration (mean over seeds):
how much of the MACs and how much of the measured latency the pruning removed. The plot puts
one against the other, so a reader sees where cutting MACs did not cut time.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

__all__ = ["structured_rows", "structured_section", "plot_structured"]


def _records(metrics: dict) -> list[dict]:
    return [
        s["records"]
        for s in metrics.get("stage_records") or []
        if s.get("stage") == "structured" and isinstance(s.get("records"), dict) and s["records"].get("widths")
    ]


def structured_rows(aggs: list[dict], metrics_of: Callable[[dict], dict]) -> list[dict[str, Any]]:
    """One record per configuration with a structured stage; ``metrics_of(run_row)`` gives a run's metrics.json."""
    out = []
    for a in aggs:
        recs = [rec for r in a["runs"] for rec in _records(metrics_of(r))[-1:]]  # the last structured stage of each run
        if not recs:
            continue

        def mean(f, recs=recs):
            vals = [v for v in (f(x) for x in recs) if v is not None]
            return statistics.fmean(vals) if vals else None

        def dense(x):
            return x.get("dense_ms_same_run") or x.get("dense_ms")

        t = recs[0].get("target") or {}
        out.append(
            {
                "label": a["label"],
                "stages": a["stages"],
                "n": len(recs),
                "acc": a.get("acc"),
                "rel_lat": a.get("rel_lat"),
                "target": f"{t.get('runtime', '?')} INT8, batch {t.get('batch', '?')}, {t.get('threads', '?')} threads",
                "budget_fraction": recs[0].get("budget_fraction"),
                "budget_ms": mean(lambda x: x.get("budget_ms")),
                "measured_ms": mean(lambda x: x.get("measured_ms")),
                "predicted_ms": mean(lambda x: x.get("predicted_ms_same_run", x.get("predicted_ms"))),
                "dense_ms": mean(dense),
                "prediction_error": mean(lambda x: x.get("prediction_error_same_run", x.get("prediction_error"))),
                "met": sum(bool(x.get("met")) for x in recs),
                "macs_cut": mean(
                    lambda x: 1 - x["macs"] / x["dense_macs"] if x.get("macs") and x.get("dense_macs") else None
                ),
                "latency_cut": mean(
                    lambda x: 1 - x["measured_ms"] / dense(x) if x.get("measured_ms") and dense(x) else None
                ),
            }
        )
    return out


def _f(v, fmt: str = ".3f") -> str:
    return "–" if v is None else format(v, fmt)


def plot_structured(rows: list[dict], title: str, plt) -> Any:
    """Left: MACs cut vs measured latency cut (the diagonal is 'the proxy is the stopwatch').
    Right: top-1 vs measured latency relative to the dense INT8 model on the target runtime."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    ax = axes[0]
    pts = [r for r in rows if r["macs_cut"] is not None and r["latency_cut"] is not None]
    ax.plot([0, 100], [0, 100], color="grey", lw=1, ls="--", label="latency cut = MACs cut")
    ax.scatter([100 * r["macs_cut"] for r in pts], [100 * r["latency_cut"] for r in pts], color="tab:blue", zorder=3)
    for r in pts:
        ax.annotate(
            r["label"],
            (100 * r["macs_cut"], 100 * r["latency_cut"]),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    ax.set_xlim(0, 100), ax.set_ylim(0, 100)
    ax.set_xlabel("MACs removed, % of dense (proxy)")
    ax.set_ylabel("measured INT8 latency removed, % of dense")
    ax.set_title("proxy vs stopwatch", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax = axes[1]
    pts = [r for r in rows if r["acc"] is not None and r["measured_ms"] and r["dense_ms"]]
    ax.scatter([r["measured_ms"] / r["dense_ms"] for r in pts], [r["acc"] for r in pts], color="tab:orange", zorder=3)
    for r in pts:
        ax.annotate(
            r["label"],
            (r["measured_ms"] / r["dense_ms"], r["acc"]),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    ax.set_xlabel("measured INT8 latency / dense INT8 latency (target runtime, same run)")
    ax.set_ylabel("top-1 % of the deployed model")
    ax.set_title("accuracy vs measured latency", fontsize=10)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def structured_section(
    doc, aggs: list[dict], metrics_of: Callable[[dict], dict], gname: str, slug: str, *, plt, png
) -> None:
    """Append the structured-pruning table and plot to ``doc`` (nothing when no run has a structured stage)."""
    rows = structured_rows(aggs, metrics_of)
    if not rows:
        return
    doc.h(3, "Structured pruning: latency budgets, measured")
    doc.p(
        "Per configuration with a structured stage (mean over seeds): the budget, the chosen model's INT8 latency "
        "measured on the target runtime beside the dense model in the same run, the latency model's prediction for that run "
        "(anchored to the dense and floor models' readings in it) and its error (predicted / measured − 1), how many seeds met the budget, and the share of MACs (a proxy) and of "
        "measured latency that the pruning removed. Top-1 and rel. latency are the deployed model's, as in the table above."
    )
    doc.table(
        [
            "configuration",
            "stages",
            "n",
            "target",
            "budget",
            "dense ms",
            "measured ms",
            "predicted ms",
            "pred. error",
            "met",
            "MACs cut",
            "latency cut",
            "top-1 %",
        ],
        [
            [
                r["label"],
                r["stages"],
                r["n"],
                r["target"],
                (f"{r['budget_fraction']:g}× dense = " if r["budget_fraction"] else "") + _f(r["budget_ms"]) + " ms",
                _f(r["dense_ms"]),
                _f(r["measured_ms"]),
                _f(r["predicted_ms"]),
                _f(r["prediction_error"], "+.3f"),
                f"{r['met']}/{r['n']}",
                _f(None if r["macs_cut"] is None else 100 * r["macs_cut"], ".1f") + "%",
                _f(None if r["latency_cut"] is None else 100 * r["latency_cut"], ".1f") + "%",
                _f(r["acc"], ".2f"),
            ]
            for r in rows
        ],
    )
    doc.image(
        f"structured_{slug}.png",
        png(plot_structured(rows, f"structured pruning, {gname}", plt)),
        f"MACs cut vs measured latency cut, and accuracy vs measured latency, {gname}",
    )
