"""pqd report: Pareto frontier on known points; report files with embedded plots from a synthetic table."""

from __future__ import annotations

import base64
import itertools
import sys

import pytest

from pqd.commands.report import build_report, dominators, pareto_front
from pqd.commands.sweep import ResultTable, Run, row_for
from pqd.errors import PqdError
from pqd.run.config import RunConfig
from pqd.stages import get_stage

MAX_MIN_MIN = ("max", "min", "min")  # accuracy up, size down, latency down


def test_pareto_front_on_known_points():
    pts = [
        (90.0, 10.0, 5.0),  # 0 front
        (85.0, 5.0, 5.0),  # 1 front (smaller)
        (80.0, 20.0, 10.0),  # 2 dominated by 0 and 1
        (90.0, 10.0, 5.0),  # 3 duplicate of 0: neither dominates the other -> front
        (95.0, 30.0, 1.0),  # 4 front (most accurate, fastest)
        (89.0, 10.0, 5.0),  # 5 dominated by 0 and 3 only (1 is less accurate)
        (85.0, 5.0, 6.0),  # 6 dominated by 1 (equal but slower)
    ]
    assert pareto_front(pts, MAX_MIN_MIN) == [0, 1, 3, 4]
    assert dominators(pts, MAX_MIN_MIN) == {2: [0, 1, 3, 5, 6], 5: [0, 3], 6: [1]}
    # the senses matter: maximising size instead flips who wins
    assert pareto_front(pts, ("max", "max", "min")) == [4]
    assert pareto_front([], MAX_MIN_MIN) == []
    with pytest.raises(ValueError, match="sense"):
        pareto_front(pts, ("max", "min", "fast"))
    with pytest.raises(ValueError, match="non-finite"):
        pareto_front([(1.0, float("nan"), 1.0)], MAX_MIN_MIN)


def _metrics(stages: str, acc: float, size: int, lat: float, sparsity: float, proxy: float | None):
    form = "int8" if "Q" in stages else "fp32"
    m = {
        "schema": 3,
        "model": "resnet18",
        "width": 0.25,
        "dataset": "cifar10",
        "num_classes": 10,
        "stages": stages,
        "stage_order": [get_stage(s.split(":")[0]).name for s in stages.split(",") if s],
        "pruned": "P" in stages,
        "quantize_mode": "qat" if form == "int8" else None,
        "prune_criterion": "magnitude" if "P" in stages else None,
        "final_form": form,
        "accuracy": {"teacher_top1": 0.80, "final_top1": acc},
        "sparsity": {"target": sparsity, "achieved": sparsity, "achieved_int8": None, "prunable_layers": 20},
        "size_bytes": {"teacher_fp32": 2_800_000, "final": size, "final_file": "x"}
        | ({"compact_int8": int(size * (1 - sparsity) / 2)} if form == "int8" else {}),
        "latency": [
            {"model": "teacher_fp32", "batch": 1, "median_ms": 4.0},
            {"model": f"final_{form}", "batch": 1, "median_ms": lat},
            {"model": "teacher_fp32", "batch": 64, "median_ms": 100.0},
            {"model": f"final_{form}", "batch": 64, "median_ms": lat * 20},
        ],
        "wall_time_s": 1.0,
    }
    if proxy is not None:  # as `pqd bench` merges them into metrics.json
        m["bench"] = {
            "proxies": {"teacher": {"macs": 5e7}, "final": {"macs": proxy, "nonzero_macs": proxy * (1 - sparsity)}}
        }
    return m


@pytest.fixture()
def synthetic_sweep(tmp_path):
    """A results table as `pqd sweep` writes it: dense, single techniques, 6 orders x 2 seeds, a sparsity sweep."""
    table = ResultTable(tmp_path / "results.sqlite")
    base = {"model": {"name": "resnet18", "width": 0.25}, "data": {"dataset": "cifar10"}, "teacher": {"epochs": 8}}
    entries = [("dense", "", 0.80, 2_800_000, 4.0, 0.0, "PQD")]
    entries += [
        ("qat_only", "Q:2", 0.78, 760_000, 1.4, 0.0, None),
        ("prune_only", "P:1", 0.76, 2_800_000, 4.1, 0.7, None),
        ("kd_only", "D:2", 0.81, 2_800_000, 4.0, 0.0, None),
    ]
    for i, perm in enumerate(itertools.permutations("PQD")):
        stages = ",".join({"P": "P:1", "Q": "Q:2", "D": "D:2"}[s] for s in perm)
        entries.append(("".join(perm), stages, 0.79 - 0.01 * i, 700_000, 1.3, 0.7, "PQD"))
    rows = []
    for name, stages, acc, size, lat, sp, _ in entries:
        for seed in (0, 1):
            cfg = RunConfig.from_dict(
                base | {"seed": seed, "stages": stages or "D:1", "prune": {"sparsity": sp or 0.7}}
            )
            kind = "teacher" if not stages else "pipeline"
            rid = f"teacher-{seed}" if kind == "teacher" else f"{name}__seed{seed}"
            run = Run(rid, name, kind, cfg, (("seed", seed),), f"t{seed}")
            rows.append((run, _metrics(stages, acc + 0.002 * seed, size, lat, sp, 1e6 * lat if stages else None)))
    for sp in (0.0, 0.5, 0.9, 0.95):
        cfg = RunConfig.from_dict(base | {"seed": 0, "stages": "P:1,Q:2,D:2", "prune": {"sparsity": sp}})
        run = Run(
            f"sparsity__seed0__sparsity{sp}", "sparsity", "pipeline", cfg, (("seed", 0), ("prune.sparsity", sp)), "t0"
        )
        rows.append((run, _metrics("P:1,Q:2,D:2", 0.785 - 0.1 * sp, 700_000, 1.3, sp, None)))
    for run, m in rows:
        table.upsert(row_for(run, m, tmp_path))
    return tmp_path


def test_report_files_with_tables_and_embedded_plots(synthetic_sweep):
    paths = build_report(synthetic_sweep)
    md, page = paths["markdown"].read_text(), paths["html"].read_text()
    pngs = sorted(p.name for p in paths["plots"].glob("*.png"))
    assert pngs == ["sparsity_cifar10_resnet18_w0p25.png", "tradeoffs_cifar10_resnet18_w0p25.png"]
    for name in pngs:
        data = (paths["plots"] / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
        assert "![" in md and f"(plots/{name})" in md
        assert base64.b64encode(data).decode()[:200] in page  # embedded, self-contained
    assert page.count("data:image/png;base64,") == 2 and "plots/" not in page.replace("data:image", "")
    assert "## cifar10 · resnet18 (width 0.25)" in md
    # ordering ablation: all 6 orders, mean ± std over 2 seeds, sorted by accuracy (P>Q>D first here)
    abl = md.split("Stage order ablation")[1].split("###")[0]
    orders = [
        line.split("|")[1].strip() for line in abl.splitlines() if line.startswith("| ") and ">" in line.split("|")[1]
    ]
    assert orders == ["P>Q>D", "P>D>Q", "Q>P>D", "Q>D>P", "D>P>Q", "D>Q>P"]
    assert "79.10 ± 0.14" in abl
    # frontier: the fastest/smallest accurate config and the most accurate one; dominated list names the dominator
    front = md.split("On the frontier: ")[1].splitlines()[0]
    assert "`PQD`" in front and "`kd_only`" in front and "`QPD`" not in front
    assert "| QPD | 77.10 | 0.700 | 0.325 | PDQ, PQD, sparsity__sparsity0.0 |" in md
    assert "Sparsity sweep" in md and "95%" in md
    assert (
        "| sparsity__sparsity0.95 | P:1,Q:2,D:2 | 1 | 95% | 69.00 | 0.700 | 4.0x | 0.018 |" in md
    )  # compact size column
    assert "Proxies vs measured" in md
    assert "| proxies.macs | 18 | 1.00 |" in md  # MACs proxy ranks the runs as the measured latency does


def test_report_without_proxies_says_so(synthetic_sweep):
    import json
    import sqlite3

    with sqlite3.connect(synthetic_sweep / "results.sqlite") as db:
        for rid, mj in db.execute("SELECT run_id, metrics_json FROM runs").fetchall():
            m = json.loads(mj)
            m.pop("bench", None)
            db.execute("UPDATE runs SET metrics_json=? WHERE run_id=?", (json.dumps(m), rid))
    md = build_report(synthetic_sweep)["markdown"].read_text()
    assert "Proxies vs measured" not in md and "No proxy fields" in md


def test_report_needs_matplotlib_and_a_table(synthetic_sweep, tmp_path, monkeypatch):
    with pytest.raises(PqdError, match="no results table"):
        build_report(tmp_path / "nowhere")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(PqdError, match=r"pip install 'pqd\[report\]'"):
        build_report(synthetic_sweep)


def test_report_intervals_latency_sides_and_pairwise_mcnemar(tmp_path):
    """Three configurations x 2 seeds with saved predictions (and a peer run): intervals beside top-1, the
    latency sides named, and McNemar between every pair, pooled over seeds and Holm-corrected."""
    import numpy as np

    from pqd.measure.stats import holm, mcnemar_pooled
    from pqd.run.rundir import RunDir

    n = 400
    y = np.arange(n) % 10
    table = ResultTable(tmp_path / "results.sqlite")
    base = {"model": {"name": "resnet18", "width": 0.25}, "data": {"dataset": "cifar10"}, "teacher": {"epochs": 8}}
    right = {"dense": 300, "qat_only": 290, "PQD": 340, "nncf": 296}  # images right, out of n (first k right)
    tables = {}
    for seed in (0, 1):
        for name, stages in (("dense", ""), ("qat_only", "Q:2"), ("PQD", "P:1,Q:2,D:2"), ("nncf", "peer")):
            k = right[name] + 5 * seed
            kind = {"dense": "teacher", "nncf": "peer"}.get(name, "pipeline")
            cfg = RunConfig.from_dict(base | {"seed": seed, "stages": "D:1" if stages in ("", "peer") else stages})
            rid = f"teacher-{seed}" if kind == "teacher" else f"{name}__seed{seed}"
            run = Run(rid, name, kind, cfg, (("seed", seed),), f"t{seed}", "nncf_ptq" if kind == "peer" else None)
            pred = np.where(np.arange(n) < k, y, (y + 1) % 10)
            rd = RunDir(tmp_path / "runs" / rid)
            rd.path.mkdir(parents=True)
            acc = {"test_n": n, "test_full_split": True}
            ci = {
                "top1": k / n,
                "ci_low": k / n - 0.04,
                "ci_high": k / n + 0.04,
                "n": n,
                "method": "wilson",
                "confidence": 0.95,
            }
            if kind == "peer":
                rd.save_predictions(pred)  # peers name their file in metrics
                (rd.path / "predictions.npy").rename(rd.path / "nncf_int8_predictions.npy")
                lat = [
                    {"model": m, "batch": 1, "threads": 1, "median_ms": ms, "runtime": "openvino", "precision": p}
                    for m, ms, p in (("openvino_fp32", 2.0, "fp32"), ("nncf_ptq_int8", 0.8, "int8"))
                ]
                m = {
                    "kind": "peer",
                    "peer": "nncf_ptq",
                    "model": "resnet18",
                    "width": 0.25,
                    "dataset": "cifar10",
                    "final_form": "int8",
                    "size_bytes": {"final": 800_000},
                    "accuracy": acc
                    | {
                        "teacher_top1": 0.75,
                        "final_top1": k / n,
                        "final_top1_ci": ci,
                        "predictions_file": "nncf_int8_predictions.npy",
                    },
                    "latency": lat,
                }
            else:
                rd.save_predictions(pred)
                rd.save_predictions(y, labels=True)
                m = _metrics(stages, k / n, 700_000 if stages else 2_800_000, 1.3 if stages else 4.0, 0.0, None)
                m["accuracy"] |= acc | {"final_top1_ci": ci}
            tables.setdefault(name, []).append(pred == y)
            table.upsert(row_for(run, m, tmp_path))
    md = build_report(tmp_path)["markdown"].read_text()
    assert "full test split, n=400" in md
    assert "PyTorch eager vs compiled" in md
    pqd_row = next(line for line in md.splitlines() if line.startswith("| PQD |"))
    # pooled Wilson interval over both seeds (685 of 800 right)
    from pqd.measure.stats import counts_record

    rec = counts_record(685, 800)
    assert f"85.62 ± 0.88 [{100 * rec['ci_low']:.1f}, {100 * rec['ci_high']:.1f}]" in pqd_row
    assert "INT8 @ PyTorch TorchScript / teacher FP32 @ PyTorch eager" in pqd_row
    nncf_row = next(line for line in md.splitlines() if line.startswith("| nncf |"))
    assert "peer: nncf_ptq" in nncf_row and "nncf_ptq INT8 @ OpenVINO / teacher FP32 @ OpenVINO" in nncf_row
    front = md.split("On the frontier: ")[1].splitlines()[0]
    assert "`nncf`" not in front  # another runtime's latency stays off the frontier
    pairs = md.split("Paired comparisons")[1].split("###")[0]
    lines = [
        line for line in pairs.split("\n\n")[2].splitlines() if line.startswith("| ") and not line.startswith("| A ")
    ]
    assert len(lines) == 6  # every pair of the 4 configurations
    # the PQD vs qat_only line: pooled over seeds, b = images PQD right and qat_only wrong
    expect = mcnemar_pooled(
        [(int((a & ~b).sum()), int((~a & b).sum())) for a, b in zip(tables["PQD"], tables["qat_only"], strict=True)]
    )
    line = next(line for line in lines if {c.strip() for c in line.split("|")[1:3]} == {"PQD", "qat_only"})
    assert f"| {expect['b']} | {expect['c']} |" in line or f"| {expect['c']} | {expect['b']} |" in line
    ps = [float(line.split("|")[-3]) for line in lines]
    holm_ps = [float(line.split("|")[-2]) for line in lines]
    assert holm_ps == pytest.approx([float(f"{p:.3g}") for p in holm(ps)], rel=0.01)


def test_report_structured_section_puts_macs_cut_beside_measured_latency_cut(synthetic_sweep):
    """Runs with a structured stage get a table and plot: budget, measured vs predicted latency, MACs cut vs latency cut."""
    table = ResultTable(synthetic_sweep / "results.sqlite")
    base = {"model": {"name": "resnet18", "width": 0.25}, "data": {"dataset": "cifar10"}, "teacher": {"epochs": 8}}
    # (budget fraction, MACs kept, measured ms, predicted ms): dense INT8 measured 2.0 ms in the same run
    for frac, macs_kept, ms, pred in ((0.5, 0.30, 0.96, 1.00), (0.75, 0.55, 1.40, 1.33)):
        for seed in (0, 1):
            stages = "S:1,P:1,Q:2,D:2"
            cfg = RunConfig.from_dict(base | {"seed": seed, "stages": stages, "structured": {"budget_fraction": frac}})
            run = Run(
                f"structured_{frac}__seed{seed}", f"structured_{frac}", "pipeline", cfg, (("seed", seed),), f"t{seed}"
            )
            m = _metrics(stages, 0.70 + frac / 10, 400_000, 0.9, 0.7, None)
            rec = {
                "target": {"runtime": "openvino", "batch": 1, "threads": 2},
                "budget_fraction": frac,
                "budget_ms": 2.0 * frac,
                "dense_ms": 2.1,
                "dense_ms_same_run": 2.0,
                "measured_ms": ms,
                "predicted_ms": pred,
                "prediction_error": pred / ms - 1,
                "met": ms <= 2.0 * frac,
                "macs": macs_kept * 1e8,
                "dense_macs": 1e8,
                "widths": {"g0": 8},
                "dense_widths": {"g0": 16},
            }
            m["stage_records"] = [{"index": 0, "stage": "structured", "letter": "S", "epochs": 1, "records": rec}]
            table.upsert(row_for(run, m, synthetic_sweep))
    paths = build_report(synthetic_sweep)
    md = paths["markdown"].read_text()
    sec = md.split("Structured pruning: latency budgets, measured")[1].split("\n#")[0]
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
        for line in sec.splitlines()
        if line.startswith("| structured_")
    }
    assert set(rows) == {"structured_0.5", "structured_0.75"}
    half = rows["structured_0.5"]
    assert half[3] == "openvino INT8, batch 1, 2 threads" and half[4] == "0.5× dense = 1.000 ms"
    assert half[6] == "0.960" and half[9] == "2/2"  # measured, and both seeds met the budget
    assert half[10] == "70.0%" and half[11] == "52.0%"  # MACs cut 70%, measured latency cut 1 - 0.96/2.0
    assert rows["structured_0.75"][9] == "2/2" and rows["structured_0.75"][11] == "30.0%"
    png = (paths["plots"] / "structured_cifar10_resnet18_w0p25.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and "(plots/structured_cifar10_resnet18_w0p25.png)" in md


def test_report_without_structured_runs_has_no_structured_section(synthetic_sweep):
    md = build_report(synthetic_sweep)["markdown"].read_text()
    assert "Structured pruning" not in md
    assert not (synthetic_sweep / "plots" / "structured_cifar10_resnet18_w0p25.png").exists()
