"""The tune report: ``report.md`` and a self-contained ``report.html`` with every candidate (validation
and test top-1 with 95% intervals, paired drop against dense FP32, latency measured in one interleaved
run, size on disk, verdict) and the accuracy-latency frontier (``plots/frontier.png``, when matplotlib
is installed: ``pip install 'pqd[report]'``)."""

from __future__ import annotations

import base64
import html
import logging
from pathlib import Path

from pqd.commands.report.pareto import pareto_front
from pqd.commands.tune.ladder import DENSE
from pqd.deploy.runtimes import available
from pqd.safety.fsguard import atomic_write_bytes

log = logging.getLogger("pqd.tune")

COLUMNS = (
    "candidate",
    "rung",
    "stages",
    "val top-1 % [95% CI]",
    "drop vs FP32, points [95% CI]",
    "test top-1 % [95% CI]",
    "test drop",
    "median ms",
    "p90 ms",
    "x vs FP32",
    "x vs dense INT8",
    "MB",
    "verdict",
)


def _pct(rec: dict) -> str:
    return f"{100 * rec['top1']:.2f} [{100 * rec['ci_low']:.1f}, {100 * rec['ci_high']:.1f}]"


def _x(v: float | None) -> str:
    return "" if v is None else f"{v:.2f}x"


def rows(record: dict) -> list[list[str]]:
    """One table row per candidate, in the order they ran (failed ones with their error)."""
    dense, dlat = record["dense"], record["dense"].get("latency") or {}
    out = [
        [
            DENSE,
            "dense",
            "",
            _pct(dense["val"]),
            "0",
            _pct(dense["test"]),
            "0",
            f"{dlat['median_ms']:.3f}" if dlat else "",
            f"{dlat['p90_ms']:.3f}" if dlat else "",
            "1.00x",
            _x(dlat.get("x_vs_dense_int8")),
            f"{dense['size_mb']:.2f}" if "size_mb" in dense else "",
            dense.get("verdict", ""),
        ]
    ]
    for c in record["candidates"]:
        cand, ev, lat = c["candidate"], c.get("eval"), c.get("latency") or {}
        if ev is None:
            out.append([cand["name"], cand["rung"], cand["stages"], *[""] * 9, c.get("verdict") or "failed"])
            continue
        lo, hi = ev["val"]["drop_ci_points"]
        out.append(
            [
                cand["name"],
                cand["rung"],
                cand["stages"],
                _pct(ev["val"]),
                f"{ev['val']['drop_points']:+.2f} [{lo:+.2f}, {hi:+.2f}]",
                _pct(ev["test"]),
                f"{ev['test']['drop_points']:+.2f}",
                f"{lat['median_ms']:.3f}" if lat else "",
                f"{lat['p90_ms']:.3f}" if lat else "",
                _x(lat.get("x_vs_dense_fp32")),
                _x(lat.get("x_vs_dense_int8")),
                f"{ev['size_mb']:.2f}",
                c.get("verdict", ""),
            ]
        )
    return out


def frontier_points(record: dict) -> list[tuple[str, float, float]]:
    """(name, median ms, validation top-1) of every timed candidate, and which of them are on the frontier."""
    pts = []
    for c in record["candidates"]:
        if c.get("latency") and c.get("eval"):
            pts.append((c["candidate"]["name"], c["latency"]["median_ms"], c["eval"]["val"]["top1"]))
    return pts


def on_frontier(points: list[tuple[str, float, float]]) -> list[str]:
    idx = pareto_front([(ms, top1) for _, ms, top1 in points], ("min", "max"))
    return [points[i][0] for i in idx]


def plot(record: dict, path: Path) -> Path | None:
    if not available("matplotlib"):
        log.info("no frontier plot (matplotlib is not installed: pip install 'pqd[report]')")
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = frontier_points(record)
    front = set(on_frontier(pts))
    dense = record["dense"]["val"]["top1"]
    tol = record["dense"]["tolerance_points"] / 100
    lat = {r["model"]: r for r in record["latency"]["records"]}
    winner = record["choice"]["winner"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, ms, top1 in pts:
        ax.scatter(ms, 100 * top1, color="tab:blue" if name in front else "tab:gray", zorder=3)
        ax.annotate(name, (ms, 100 * top1), fontsize=8, xytext=(4, 3), textcoords="offset points")
    fr = sorted((ms, 100 * t) for n, ms, t in pts if n in front)
    if fr:
        ax.step([p[0] for p in fr], [p[1] for p in fr], where="post", color="tab:blue", lw=1, label="frontier")
    if DENSE in lat:
        ax.scatter(lat[DENSE]["median_ms"], 100 * dense, marker="s", color="black", label="dense FP32", zorder=3)
    ax.axhline(100 * (dense - tol), color="tab:red", ls="--", lw=1, label=f"tolerance ({100 * tol:.2f} points)")
    w: tuple[str, float, float] | None = next((p for p in pts if p[0] == winner), None)
    if winner == DENSE and DENSE in lat:
        w = (DENSE, lat[DENSE]["median_ms"], dense)
    if w is not None:
        ax.scatter(w[1], 100 * w[2], s=160, facecolors="none", edgecolors="tab:green", lw=2, label="winner", zorder=4)
    lt = record["latency"]
    ax.set_xlabel(f"median latency, ms ({lt['runtime']}, batch {lt['batch']}, {lt['threads']} threads)")
    ax.set_ylabel("validation top-1, %")
    ax.set_title("pqd tune: accuracy vs measured latency")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def markdown(record: dict, plot_name: str | None) -> str:
    ch, dense, lt = record["choice"], record["dense"], record["latency"]
    env = lt.get("env", {})
    lines = [
        "# pqd tune",
        "",
        f"**{ch['message']}.**" if ch["met"] else f"**Not met: {ch['message']}.**",
        "",
        f"Tolerance: at most {dense['tolerance_points']:.2f} top-1 points below dense FP32 on the validation split "
        f"({dense['val']['n']} images held out from training), rule '{record['tune']['rule']}' "
        "(point: the measured paired drop; upper: the upper end of its 95% interval).",
        f"Dense FP32: validation {_pct(dense['val'])}, test {_pct(dense['test'])} (PyTorch)."
        + (
            " **The validation images look seen in training** (the dense model is clearly better on them than on "
            "the test split): validation drops overstate drops on unseen images; compare the test drop column."
            if dense.get("val_looks_seen")
            else ""
        ),
        f"Latency: {lt['runtime']}, batch {lt['batch']}, {lt['threads']} threads, every model in one interleaved run "
        f"(worker processes, rotating rounds); CPU: {env.get('cpu_model', '?')}; torch {env.get('torch', '?')}; "
        f"{', '.join(f'{k} {v}' for k, v in (lt.get('runtimes') or {}).items() if v)}.",
        f"Budget: {record['budget']['stated']}.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows(record)]
    lines += ["", "Why the ladder stopped: " + "; ".join(record["notes"]) + "."]
    if plot_name:
        lines += ["", f"![accuracy vs latency]({plot_name})"]
    lines += ["", "Files: `winner/` (" + ", ".join(ch.get("files", [])) + "); `pqd predict winner IMAGE...`."]
    return "\n".join(lines) + "\n"


def write_report(record: dict, out: Path) -> dict[str, Path]:
    png = plot(record, out / "plots" / "frontier.png")
    md = markdown(record, "plots/frontier.png" if png else None)
    atomic_write_bytes(out / "report.md", md.encode())
    body = [f"<p>{html.escape(line)}</p>" for line in md.splitlines() if line and not line.startswith(("|", "!"))]
    table = [
        "<table border='1' cellpadding='3'><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS) + "</tr>"
    ]
    table += ["<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in r) + "</tr>" for r in rows(record)]
    table.append("</table>")
    img = (
        f"<p><img alt='accuracy vs latency' src='data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}'></p>"
        if png
        else ""
    )
    doc = "<!doctype html><meta charset='utf-8'><title>pqd tune</title>" + "".join(body[:6]) + "".join(table)
    doc += img + "".join(body[6:])
    atomic_write_bytes(out / "report.html", doc.encode())
    return {"md": out / "report.md", "html": out / "report.html"} | ({"plot": png} if png else {})
