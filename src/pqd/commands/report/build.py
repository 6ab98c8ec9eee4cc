"""Build the sweep report: tables, plots, Pareto frontier, ordering ablation, proxies.

Points in the plots and the frontier are *configurations* (a variant with its grid values),
averaged over seeds. Latency is compared as the ratio final / teacher of batch-1 medians,
because both are timed interleaved in the same run; that ratio survives a busy machine
far better than absolute milliseconds (which the tables also list).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pqd.commands.report.degradation import degradation_section
from pqd.commands.report.pareto import dominators, pareto_front
from pqd.commands.report.structured import structured_section
from pqd.commands.sweep import read_table
from pqd.errors import PqdError
from pqd.measure.stats import counts_record, holm, mcnemar_pooled, spearman

SENSES = ("max", "min", "min")  # accuracy, size, relative latency


# ------------------------------------------------------------------------------------------
# data


def _mean_std(xs: Iterable[float | None]) -> tuple[float | None, float | None, int]:
    v = [x for x in xs if x is not None and math.isfinite(x)]
    if not v:
        return None, None, 0
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else None), len(v)


def config_label(row: dict) -> str:
    """Run id without its seed axis: the configuration a run belongs to."""
    if row["kind"] == "teacher":
        return row["variant"]
    parts = row["run_id"].split("__")
    return "__".join([parts[0]] + [p for p in parts[1:] if not (p.startswith("seed") and p[4:].lstrip("-").isdigit())])


def aggregate(rows: list[dict]) -> list[dict]:
    """One record per (dataset, model, width, configuration): means/stds over seeds."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["dataset"], r["model"], r["width"], config_label(r))].append(r)
    out = []
    for (dataset, model, width, label), rs in groups.items():
        rel = [
            r["lat_b1_final_ms"] / r["lat_b1_teacher_ms"] for r in rs if r["lat_b1_final_ms"] and r["lat_b1_teacher_ms"]
        ]
        relmax = [
            r["lat_bmax_final_ms"] / r["lat_bmax_teacher_ms"]
            for r in rs
            if r["lat_bmax_final_ms"] and r["lat_bmax_teacher_ms"]
        ]
        acc, acc_sd, n = _mean_std(100 * r["final_top1"] for r in rs if r["final_top1"] is not None)
        t_acc, _, _ = _mean_std(100 * r["teacher_top1"] for r in rs if r["teacher_top1"] is not None)
        rl, rl_sd, _ = _mean_std(rel)
        first = rs[0]
        counted = [(r["final_top1"], int(r["test_n"])) for r in rs if r["final_top1"] is not None and r.get("test_n")]
        # Wilson interval of the pooled correct count over seeds (every seed tested on the same images)
        pooled = counts_record(round(sum(t * n for t, n in counted)), sum(n for _, n in counted)) if counted else None
        out.append(
            {
                "dataset": dataset,
                "model": model,
                "width": width,
                "label": label,
                "n": n,
                "seeds": sorted(r["seed"] for r in rs),
                "kind": first["kind"],
                "stages": first["stages"],
                "order": first["stage_order"],
                "criterion": first["prune_criterion"],
                "qmode": first["quantize_mode"],
                "sparsity": first["sparsity_target"] or 0.0,
                "sparsity_achieved": _mean_std(r["sparsity_achieved"] for r in rs)[0],
                "acc": acc,
                "acc_sd": acc_sd,
                "teacher_acc": t_acc,
                "acc_ci": pooled,
                "test_n": first.get("test_n"),
                "test_full_split": first.get("test_full_split"),
                "lat_sides": _lat_sides(first),
                "size_mb": _mean_std(r["size_final_bytes"] / 1e6 for r in rs if r["size_final_bytes"])[0],
                "compact_mb": _mean_std(c / 1e6 for c in map(_compact_bytes, rs) if c)[0],
                "teacher_mb": _mean_std(r["size_teacher_bytes"] / 1e6 for r in rs if r["size_teacher_bytes"])[0],
                "lat_ms": _mean_std(r["lat_b1_final_ms"] for r in rs)[0],
                "teacher_lat_ms": _mean_std(r["lat_b1_teacher_ms"] for r in rs)[0],
                "rel_lat": rl,
                "rel_lat_sd": rl_sd,
                "rel_lat_bmax": _mean_std(relmax)[0],
                "bmax": first["lat_bmax"],
                "runs": rs,
            }
        )
    out.sort(
        key=lambda a: (
            a["dataset"],
            a["model"],
            a["width"],
            a["kind"] != "teacher",
            len(a["order"].split(">")),
            a["label"],
        )
    )
    return out


def _lat_sides(row: dict) -> str:
    """What a row's latency ratio compares: 'INT8 @ PyTorch TorchScript / teacher FP32 @ PyTorch eager'."""
    if row.get("lat_final_label") and row.get("lat_teacher_label"):
        return f"{row['lat_final_label']} / {row['lat_teacher_label']}"
    form = (row.get("final_form") or "fp32").upper()  # tables written before the labels: a pipeline run, all PyTorch
    return f"{form} @ PyTorch {'TorchScript' if form == 'INT8' else 'eager'} / teacher FP32 @ PyTorch eager"


def _ci(rec: dict | None) -> str:
    if not rec or rec.get("ci_low") is None:
        return ""
    return f" [{100 * rec['ci_low']:.1f}, {100 * rec['ci_high']:.1f}]"


def _row_ci(row: dict, key: str) -> str:
    low, high = row.get(f"{key}_ci_low"), row.get(f"{key}_ci_high")
    return f" [{100 * low:.1f}, {100 * high:.1f}]" if low is not None and high is not None else ""


def _compact_bytes(row: dict) -> int | None:
    """Bytes of the compact INT8 checkpoint, if the run wrote one (older tables: from metrics_json)."""
    if row.get("size_compact_bytes"):
        return row["size_compact_bytes"]
    return json.loads(row.get("metrics_json") or "{}").get("size_bytes", {}).get("compact_int8")


def _epochs_key(stages: str) -> tuple:
    return tuple(sorted(s for s in stages.split(",") if s))


# ------------------------------------------------------------------------------------------
# document model: blocks rendered to Markdown and HTML


class Doc:
    def __init__(self):
        self.blocks: list[tuple[str, Any]] = []
        self.images: dict[str, bytes] = {}

    def h(self, level: int, text: str):
        self.blocks.append(("h", (level, text)))

    def p(self, text: str):
        self.blocks.append(("p", text))

    def table(self, headers: list[str], rows: list[list[Any]]):
        self.blocks.append(("table", (headers, rows)))

    def image(self, name: str, png: bytes, alt: str):
        self.images[name] = png
        self.blocks.append(("img", (name, alt)))

    def markdown(self) -> str:
        out = []
        for kind, val in self.blocks:
            if kind == "h":
                out.append(f"{'#' * val[0]} {val[1]}\n")
            elif kind == "p":
                out.append(val + "\n")
            elif kind == "table":
                headers, rows = val
                out.append("| " + " | ".join(headers) + " |")
                out.append("|" + "|".join("---" for _ in headers) + "|")
                out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
                out.append("")
            elif kind == "img":
                out.append(f"![{val[1]}](plots/{val[0]})\n")
        return "\n".join(out)

    def html(self, title: str) -> str:
        css = (
            "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
            "table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}"
            "th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #eee}"
            "code{background:#f5f5f5;padding:1px 3px}"
        )
        out = [
            f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{css}</style></head><body>"
        ]
        for kind, val in self.blocks:
            if kind == "h":
                out.append(f"<h{val[0]}>{html.escape(val[1])}</h{val[0]}>")
            elif kind == "p":
                out.append(f"<p>{_inline(val)}</p>")
            elif kind == "table":
                headers, rows = val
                out.append("<table><tr>" + "".join(f"<th>{html.escape(str(c))}</th>" for c in headers) + "</tr>")
                out += ["<tr>" + "".join(f"<td>{_inline(str(c))}</td>" for c in r) + "</tr>" for r in rows]
                out.append("</table>")
            elif kind == "img":
                b64 = base64.b64encode(self.images[val[0]]).decode()
                out.append(f"<p><img alt='{html.escape(val[1])}' src='data:image/png;base64,{b64}'></p>")
        out.append("</body></html>")
        return "\n".join(out)


def _inline(text: str) -> str:
    """Escape, then render **bold** and `code` (the only Markdown the report uses inline)."""
    import re

    t = html.escape(text)
    t = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", t)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", t)


def _f(x: float | None, fmt: str = ".2f", sd: float | None = None) -> str:
    if x is None:
        return "–"
    s = format(x, fmt)
    return f"{s} ± {format(sd, fmt)}" if sd is not None else s


# ------------------------------------------------------------------------------------------
# plots


_COLORS = {0: "black", 1: "tab:blue", 2: "tab:orange", 3: "tab:green"}


def _mpl():
    try:
        import matplotlib
    except ImportError:
        raise PqdError("pqd report draws its plots with matplotlib: pip install 'pqd[report]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _mpl().close(fig)
    return buf.getvalue()


def _n_stages(a: dict) -> int:
    return 0 if a["kind"] == "teacher" else len(a["order"].split(">"))


def plot_tradeoffs(aggs: list[dict], front: set[int], title: str) -> bytes:
    """Accuracy vs relative latency and vs size; frontier points ringed and labelled."""
    plt = _mpl()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    keys: list[str] = []
    for ax, key, xlabel in (
        (axes[0], "rel_lat", "batch-1 latency relative to the FP32 teacher (lower is faster)"),
        (axes[1], "size_mb", "file size on disk, MB (log scale)"),
    ):
        for n in sorted({_n_stages(a) for a in aggs}):
            pts = [
                (a[key], a["acc"]) for a in aggs if _n_stages(a) == n and a[key] is not None and a["acc"] is not None
            ]
            if pts:
                name = {0: "dense FP32", 1: "one technique", 2: "two stages", 3: "three stages"}[n]
                ax.scatter(*zip(*pts, strict=True), s=28, color=_COLORS[n], alpha=0.75, label=name, zorder=2)
        # frontier: ringed, numbered by accuracy; the numbers are keyed in a box (labels never overlap the points)
        fr = sorted(
            ((aggs[i][key], aggs[i]["acc"], aggs[i]["label"]) for i in front if aggs[i][key] is not None),
            key=lambda t: -t[1],
        )
        if fr:
            ax.scatter(
                [x for x, _, _ in fr],
                [y for _, y, _ in fr],
                s=130,
                facecolors="none",
                edgecolors="red",
                linewidths=1.6,
                label="Pareto frontier (acc↑ size↓ latency↓)",
                zorder=3,
            )
            for k, (x, y, _) in enumerate(fr, 1):
                ax.annotate(
                    str(k),
                    (x, y),
                    textcoords="offset points",
                    xytext=(-4 - 7 * (k % 2), 6 if k % 2 else -12),
                    fontsize=8,
                    color="darkred",
                    weight="bold",
                )
            keys.append("   ".join(f"{k}: {lab.replace('__', ' ')}" for k, (_, _, lab) in enumerate(fr, 1)))
        if key == "size_mb":
            from matplotlib.ticker import FuncFormatter

            ax.set_xscale("log")
            for axis in (ax.xaxis,):
                axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                axis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if str(f"{v:g}")[0] in "1235" else ""))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("top-1 accuracy, % (mean over seeds)")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(
        handles, labels, loc="lower center", ncol=len(labels), fontsize=8, bbox_to_anchor=(0.5, -0.04), frameon=False
    )
    if keys:
        fig.text(
            0.5,
            -0.09,
            "frontier (numbered by accuracy): " + keys[0],
            ha="center",
            fontsize=8,
            color="darkred",
            wrap=True,
        )
    fig.suptitle(title)
    return _png(fig)


def plot_sparsity(series: dict[str, list[dict]], title: str) -> bytes:
    plt = _mpl()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.2))
    for name, aggs in series.items():
        aggs = sorted(aggs, key=lambda a: a["sparsity"])
        xs = [100 * a["sparsity"] for a in aggs]
        a1.errorbar(
            xs, [a["acc"] for a in aggs], yerr=[a["acc_sd"] or 0 for a in aggs], marker="o", capsize=3, label=name
        )
        a2.plot(xs, [a["rel_lat"] for a in aggs], marker="o", label=name)
    a1.set_xlabel("target sparsity, %")
    a1.set_ylabel("top-1 accuracy, %")
    a2.set_xlabel("target sparsity, %")
    a2.set_ylabel("batch-1 latency / teacher latency")
    a2.axhline(1.0, color="gray", lw=0.8, ls="--")
    a2.set_ylim(bottom=0)
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.suptitle(title)
    return _png(fig)


# ------------------------------------------------------------------------------------------
# proxies (fields another part of pqd may add to metrics.json; skipped when absent)


def _numeric_leaves(obj: Any, prefix: str) -> dict[str, float]:
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_numeric_leaves(v, f"{prefix}.{k}"))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool) and math.isfinite(obj):
        out[prefix] = float(obj)
    return out


def proxies(metrics: dict) -> dict[str, float]:
    """Cost proxies of the final model, if metrics.json has them: ``bench.proxies.final`` (written by
    ``pqd bench``), else numeric values under any top-level key that mentions 'proxy'."""
    bench = b if isinstance(b := metrics.get("bench"), dict) else {}
    for src, name in ((bench.get("proxies"), "proxies"), (metrics.get("proxies"), "proxies")):
        if isinstance(src, dict) and src:
            final = src.get("final", src)
            return _numeric_leaves(final, name)
    out = {}
    for k, v in metrics.items():
        if "prox" in k.lower():
            out.update(_numeric_leaves(v, k))
    return out


# ------------------------------------------------------------------------------------------
# the report


def build_report(sweep_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Path]:
    sweep_dir = Path(sweep_dir)
    rows = read_table(sweep_dir)
    if not rows:
        raise PqdError(f"the results table in {sweep_dir} has no finished runs yet")
    _mpl()  # fail early and clearly when matplotlib is missing
    out = Path(out_dir) if out_dir else sweep_dir
    doc = Doc()
    doc.h(1, f"pqd sweep report: {sweep_dir.resolve().name}")
    env = _env(sweep_dir, rows)
    n_cfg = len({config_label(r) for r in rows})
    doc.p(
        f"{len(rows)} finished runs ({n_cfg} configurations). CPU: {env.get('cpu_model', '?')}, "
        f"{env.get('threads', '?')} threads for latency, torch {env.get('torch', '?')}, "
        f"engine {env.get('quantized_engine', '?')}, git {str(env.get('git_commit'))[:10]}."
    )
    tests = sorted({(r["dataset"], r.get("test_n"), r.get("test_full_split")) for r in rows}, key=str)
    test_text = "; ".join(
        f"{d}: "
        + (
            "test split size not recorded"
            if n is None
            else f"full test split, n={n}"
            if full
            else f"test subset, n={n} (not the full split)"
        )
        for d, n, full in tests
    )
    doc.p(
        f"Accuracy is top-1 of the deployed model (INT8 TorchScript or FP32) on the test set ({test_text}); "
        "[low, high] is the Wilson 95% interval (of the correct count pooled over seeds for a configuration). Size is "
        "bytes of the deployable file on disk (Pareto size axis); **compact** is the compact INT8 checkpoint where pqd "
        "wrote one. Latency is the batch-1 median; **rel. latency** = final / teacher median, both timed interleaved in "
        "the same run (robust to machine load), in the runtimes the **latency sides** column names: for pqd runs that "
        "is TorchScript INT8 vs PyTorch eager FP32, a *PyTorch eager vs compiled* ratio that mixes INT8 with leaving "
        "eager mode (an extra, not a same-runtime speed-up; run `pqd bench` for those); a peer run's two sides share "
        "its runtime. ± is the std over seeds; n = seeds. Points in plots and the Pareto frontier are configurations "
        "averaged over seeds; peer runs (timed in another runtime) are left out of the frontier."
    )

    aggs_all = aggregate(rows)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for a in aggs_all:
        groups[(a["dataset"], a["model"], a["width"])].append(a)

    for (dataset, model, width), aggs in groups.items():
        gname = f"{dataset} · {model} (width {width:g})"
        slug = f"{dataset}_{model}_w{width:g}".replace(".", "p")
        ok = [
            i for i, a in enumerate(aggs) if None not in (a["acc"], a["size_mb"], a["rel_lat"]) and a["kind"] != "peer"
        ]
        pts = [(aggs[i]["acc"], aggs[i]["size_mb"], aggs[i]["rel_lat"]) for i in ok]
        front = {ok[i] for i in pareto_front(pts, SENSES)}
        dom = {ok[i]: [ok[j] for j in js] for i, js in dominators(pts, SENSES).items()}
        doc.h(2, gname)
        doc.table(
            [
                "configuration",
                "stages",
                "n",
                "sparsity",
                "top-1 % [95% CI]",
                "size MB",
                "compression",
                "compact MB",
                "b1 ms",
                "rel. latency b1",
                f"rel. latency b{aggs[0]['bmax'] or '-'}",
                "latency sides (final / teacher)",
                "Pareto",
            ],
            [
                [
                    a["label"],
                    f"peer: {a['runs'][0].get('peer')}" if a["kind"] == "peer" else a["stages"] or "dense",
                    a["n"],
                    f"{100 * a['sparsity']:.0f}%",
                    _f(a["acc"], ".2f", a["acc_sd"]) + _ci(a["acc_ci"]),
                    _f(a["size_mb"], ".3f"),
                    _f(a["teacher_mb"] / a["size_mb"] if a["size_mb"] and a["teacher_mb"] else None, ".1f") + "x",
                    _f(a["compact_mb"], ".3f"),
                    _f(a["lat_ms"], ".3f"),
                    _f(a["rel_lat"], ".3f", a["rel_lat_sd"]),
                    _f(a["rel_lat_bmax"], ".3f"),
                    a["lat_sides"],
                    "**yes**" if i in front else "",
                ]
                for i, a in enumerate(aggs)
            ],
        )
        self_ratios = [
            r["lat_b1_final_ms"] / r["lat_b1_teacher_ms"]
            for a in aggs
            if a["kind"] == "teacher"
            for r in a["runs"]
            if r["lat_b1_final_ms"] and r["lat_b1_teacher_ms"]
        ]
        if self_ratios:
            doc.p(
                f"Latency noise floor: the dense runs time the teacher against itself; their b1 ratios are "
                f"{', '.join(f'{x:.3f}' for x in self_ratios)} (1.000 = no noise). Latency differences of that order "
                "are not resolved, and they can decide frontier membership among models of equal size."
            )
        name = f"tradeoffs_{slug}.png"
        doc.image(name, plot_tradeoffs(aggs, front, gname), f"accuracy vs latency and size, {gname}")
        doc.h(3, "Pareto frontier (accuracy↑, size↓, relative latency↓)")
        doc.p("On the frontier: " + ", ".join(f"`{aggs[i]['label']}`" for i in sorted(front)) + ".")
        if dom:
            doc.table(
                ["dominated configuration", "top-1 %", "size MB", "rel. latency", "dominated by"],
                [
                    [
                        aggs[i]["label"],
                        _f(aggs[i]["acc"]),
                        _f(aggs[i]["size_mb"], ".3f"),
                        _f(aggs[i]["rel_lat"], ".3f"),
                        ", ".join(aggs[j]["label"] for j in js),
                    ]
                    for i, js in sorted(dom.items())
                ],
            )
        _paired_tests(doc, aggs, sweep_dir)
        _ordering(doc, aggs, gname)
        _sparsity(doc, aggs, gname, slug)
        _proxy_section(doc, aggs, sweep_dir)
        structured_section(doc, aggs, lambda r: _fresh_metrics(r, sweep_dir), gname, slug, plt=_mpl(), png=_png)
        degradation_section(doc, aggs)

    doc.h(2, "All runs")
    doc.table(
        [
            "run",
            "seed",
            "stages",
            "top-1 % [95% CI]",
            "teacher % [95% CI]",
            "test n",
            "size bytes",
            "b1 ms",
            "teacher b1 ms",
            "teacher / final b1",
            "latency sides (final / teacher)",
            "wall s",
        ],
        [
            [
                r["run_id"],
                r["seed"],
                f"peer: {r.get('peer')}" if r["kind"] == "peer" else r["stages"] or "dense",
                _f(100 * r["final_top1"]) + _row_ci(r, "final_top1"),
                _f(100 * r["teacher_top1"]) + _row_ci(r, "teacher_top1"),
                "–"
                if r.get("test_n") is None
                else f"{r['test_n']}{'' if r.get('test_full_split') in (1, None) else ' (subset)'}",
                r["size_final_bytes"],
                _f(r["lat_b1_final_ms"], ".3f"),
                _f(r["lat_b1_teacher_ms"], ".3f"),
                _f(r["lat_b1_speedup"], ".2f"),
                _lat_sides(r),
                _f(r["wall_time_s"], ".0f"),
            ]
            for r in rows
        ],
    )

    from pqd.safety.fsguard import atomic_write_bytes, safe_replace

    for name, png in doc.images.items():  # plots/ is pqd's own folder (the --out folder was checked)
        atomic_write_bytes(out / "plots" / name, png)
    md, page = out / "report.md", out / "report.html"
    # never over a report.md/html pqd did not write (pqd.safety.fsguard)
    safe_replace(md, doc.markdown().encode())
    safe_replace(page, doc.html(f"pqd report {sweep_dir.name}").encode())
    return {"markdown": md, "html": page, "plots": out / "plots"}


def _fresh_metrics(row: dict, sweep_dir: Path) -> dict:
    """The run's metrics.json as it is now (``pqd bench`` adds to it after the sweep), else the table's copy."""
    from pqd.run.rundir import RunDir

    current = RunDir(sweep_dir / row["run_dir"]).read_metrics()
    return current if current is not None else json.loads(row["metrics_json"])


def _env(sweep_dir: Path, rows: list[dict]) -> dict:
    for r in rows:
        p = sweep_dir / r["run_dir"] / "env.json"
        if p.is_file():
            return json.loads(p.read_text())
    return {}


def _ordering(doc: Doc, aggs: list[dict], gname: str) -> None:
    """The 6-orders ablation: three-stage configurations equal but for the order."""
    keyed: dict[tuple, list[dict]] = defaultdict(list)
    for a in aggs:
        if _n_stages(a) == 3:
            keyed[(a["sparsity"], a["criterion"], a["qmode"], _epochs_key(a["stages"]))].append(a)
    for (sp, crit, qmode, epochs), group in keyed.items():
        if len({a["order"] for a in group}) < 2:
            continue
        group = sorted(group, key=lambda a: -(a["acc"] or 0))
        doc.h(3, f"Stage order ablation ({', '.join(epochs)}; sparsity {100 * sp:.0f}%, {crit} pruning, {qmode})")
        doc.p("Each stage keeps its epochs wherever it moves. Sorted by accuracy.")
        doc.table(
            [
                "order",
                "configuration",
                "stages",
                "n",
                "top-1 % (mean ± std)",
                "size MB",
                "rel. latency b1",
                "achieved sparsity",
            ],
            [
                [
                    a["order"],
                    a["label"],
                    a["stages"],
                    a["n"],
                    _f(a["acc"], ".2f", a["acc_sd"]),
                    _f(a["size_mb"], ".3f"),
                    _f(a["rel_lat"], ".3f", a["rel_lat_sd"]),
                    _f(a["sparsity_achieved"], ".3f"),
                ]
                for a in group
            ],
        )


def _sparsity(doc: Doc, aggs: list[dict], gname: str, slug: str) -> None:
    series: dict[str, list[dict]] = defaultdict(list)
    for a in aggs:
        if "P" in a["order"].split(">") and a["criterion"] == "magnitude":
            series[a["stages"]].append(a)
    series = {k: v for k, v in series.items() if len({a["sparsity"] for a in v}) >= 3}
    if not series:
        return
    doc.h(3, "Sparsity sweep (magnitude pruning)")
    doc.table(
        ["stages", "target sparsity", "achieved", "n", "top-1 %", "size MB", "compact MB", "rel. latency b1"],
        [
            [
                k,
                f"{100 * a['sparsity']:.0f}%",
                _f(a["sparsity_achieved"], ".3f"),
                a["n"],
                _f(a["acc"], ".2f", a["acc_sd"]),
                _f(a["size_mb"], ".3f"),
                _f(a["compact_mb"], ".3f"),
                _f(a["rel_lat"], ".3f", a["rel_lat_sd"]),
            ]
            for k, v in series.items()
            for a in sorted(v, key=lambda a: a["sparsity"])
        ],
    )
    name = f"sparsity_{slug}.png"
    doc.image(name, plot_sparsity(series, f"sparsity sweep, {gname}"), f"accuracy and latency vs sparsity, {gname}")


def _proxy_section(doc: Doc, aggs: list[dict], sweep_dir: Path) -> None:
    per_run = []
    for a in aggs:
        for r in a["runs"]:
            px = proxies(_fresh_metrics(r, sweep_dir))
            if px:
                per_run.append((r, px))
    if not per_run:
        doc.p("No proxy fields in metrics.json (no `*proxy*` keys), so there is no proxy-vs-measured comparison.")
        return
    doc.h(3, "Proxies vs measured")
    names = sorted({k for _, px in per_run for k in px})
    table = []
    for k in names:
        pairs = [
            (px[k], r["lat_b1_final_ms"], r["size_final_bytes"])
            for r, px in per_run
            if k in px and r["lat_b1_final_ms"]
        ]
        rho_lat = spearman([p for p, _, _ in pairs], [m for _, m, _ in pairs])
        rho_size = spearman([p for p, _, _ in pairs], [s for _, _, s in pairs])
        table.append([k, len(pairs), _f(rho_lat, ".2f"), _f(rho_size, ".2f")])
    doc.p(
        "Spearman rank correlation across runs between each proxy and the measured batch-1 latency / file size "
        "(1 = ranks runs exactly as the measurement does)."
    )
    doc.table(["proxy", "runs", "ρ vs measured b1 latency", "ρ vs measured size"], table)


# ------------------------------------------------------------------------------------------
# paired tests between configurations (McNemar on per-image predictions)


def _test_set(row: dict) -> tuple:
    """What makes two runs' predictions comparable image by image: dataset, test size, test subset."""
    data = json.loads(row.get("config_json") or "{}").get("data") or {}
    return row["dataset"], row.get("test_n"), data.get("test_subset")


def _load_predictions(row: dict, sweep_dir: Path) -> Any:
    """The final model's per-image predictions of a run (a peer run: the file its metrics name); None if absent."""
    from pqd.run.rundir import RunDir

    run = RunDir(sweep_dir / row["run_dir"])
    if row["kind"] == "peer":
        name = (json.loads(row.get("metrics_json") or "{}").get("accuracy") or {}).get("predictions_file")
        return run.load_predictions(name=name) if name else None
    return run.load_predictions()


def paired_tests(aggs: list[dict], sweep_dir: Path) -> tuple[list[dict], list[str]]:
    """McNemar's test between every two configurations tested on the same images.

    Per seed both configurations ran, the discordant counts ``b`` (A right, B wrong) and ``c``;
    pooled over seeds (:func:`pqd.measure.stats.mcnemar_pooled`); Holm-corrected over all the
    comparisons returned (one family). Returns the records and notes on what was left out.
    """
    import numpy as np

    from pqd.run.rundir import RunDir

    notes: list[str] = []
    labels: dict[tuple, Any] = {}
    preds: dict[int, dict[int, Any]] = {}  # aggregate index -> seed -> correct vector
    for a in aggs:
        for r in a["runs"]:
            if r["kind"] == "peer" or r.get("test_n") is None:
                continue
            y = RunDir(sweep_dir / r["run_dir"]).load_predictions(labels=True)
            if y is None:
                continue
            key = _test_set(r)
            if key in labels and not np.array_equal(labels[key], y):
                notes.append(f"runs of test set {key} hold different test labels; they are not compared")
                labels[key] = None
            labels.setdefault(key, y)
    for i, a in enumerate(aggs):
        for r in a["runs"]:
            y = labels.get(_test_set(r))
            p = _load_predictions(r, sweep_dir)
            if y is None or p is None:
                continue
            if len(p) != len(y):
                notes.append(f"{r['run_id']}: {len(p)} predictions for {len(y)} test images; left out")
                continue
            preds.setdefault(i, {})[r["seed"]] = (_test_set(r), p == y)
    missing = [a["label"] for i, a in enumerate(aggs) if i not in preds]
    if missing:
        notes.append(
            "no per-image predictions (runs made before pqd saved them, or missing files): "
            + ", ".join(f"`{m}`" for m in missing)
        )
    out = []
    idx = sorted(preds)
    for x, i in enumerate(idx):
        for j in idx[x + 1 :]:
            seeds = sorted(s for s in preds[i] if s in preds[j] and preds[i][s][0] == preds[j][s][0])
            if not seeds:
                continue
            tables, n, right_a, right_b = [], 0, 0, 0
            for s in seeds:
                ca, cb = preds[i][s][1], preds[j][s][1]
                tables.append((int((ca & ~cb).sum()), int((~ca & cb).sum())))
                n, right_a, right_b = n + len(ca), right_a + int(ca.sum()), right_b + int(cb.sum())
            rec = mcnemar_pooled(tables)
            out.append(
                rec
                | {
                    "a": aggs[i]["label"],
                    "b_label": aggs[j]["label"],
                    "seeds": seeds,
                    "n": n,
                    "top1_a": right_a / n,
                    "top1_b": right_b / n,
                    "difference": (right_a - right_b) / n,
                }
            )
    for rec, adj in zip(out, holm([r["p_value"] for r in out]), strict=True):
        rec["p_holm"] = adj
    return out, notes


def _paired_tests(doc: Doc, aggs: list[dict], sweep_dir: Path) -> None:
    recs, notes = paired_tests(aggs, sweep_dir)
    if not recs and not notes:
        return
    doc.h(3, "Paired comparisons (McNemar, per-image predictions on the same test images)")
    doc.p(
        "For every two configurations tested on the same images: b = images A gets right and B wrong, c = the reverse, "
        "summed over the seeds both ran (McNemar's test pooled over seeds; per-seed signs in 'seeds A/B better'). "
        "Holm-adjusted p over all comparisons in this table (one family; a claim that needs fewer comparisons may "
        "correct over its own family instead). Difference = top-1 A − top-1 B in points, over the pooled images."
    )
    if recs:
        doc.table(
            ["A", "B", "seeds", "top-1 A %", "top-1 B %", "A − B (pts)", "b", "c", "seeds A/B better", "p", "p (Holm)"],
            [
                [
                    r["a"],
                    r["b_label"],
                    ",".join(map(str, r["seeds"])),
                    _f(100 * r["top1_a"]),
                    _f(100 * r["top1_b"]),
                    _f(100 * r["difference"], "+.2f"),
                    r["b"],
                    r["c"],
                    f"{r['strata_a_better']}/{r['strata_b_better']}",
                    _f(r["p_value"], ".3g"),
                    _f(r["p_holm"], ".3g"),
                ]
                for r in recs
            ],
        )
    for note in notes:
        doc.p(f"Note: {note}.")
