"""`pqd sweep` grids over structured latency budgets; `pqd report` shows them beside the dense runs."""

from __future__ import annotations

from pathlib import Path

import pytest

import pqd.structured.latency_model as L
import pqd.structured.search as S
from pqd.cli import main
from pqd.commands.report import build_report
from pqd.commands.sweep import run_sweep

ROOT = Path(__file__).resolve().parents[2]


def test_structured_budgets_sweep_config_expands_to_a_budget_grid(capsys):
    assert (
        main(["sweep", str(ROOT / "configs" / "sweeps" / "structured_budgets.yaml"), "--out", "unused", "--dry-run"])
        == 0
    )
    out = capsys.readouterr().out
    for seed in (0, 1):
        for b in ("0.75", "0.5", "0.35"):
            assert f"hybrid__seed{seed}__budget_fraction{b}" in out
        assert f"pq_dense__seed{seed}" in out


@pytest.mark.slow
def test_sweep_over_budgets_runs_and_reports_measured_latency_per_budget(tmp_path, monkeypatch):
    real = L.measure_int8
    in_process = lambda *a, **k: real(*a, **{**k, "in_process": True})  # noqa: E731  (no worker processes in a unit test)
    monkeypatch.setattr(L, "measure_int8", in_process)
    monkeypatch.setattr(S, "measure_int8", in_process)
    spec = {
        "name": "tiny_budgets",
        "base": {
            "seed": 0,
            "model": {"name": "resnet18", "width": 0.125},
            "data": {"dataset": "digits", "train_subset": 128, "test_subset": 64},
            "train": {"batch_size": 32, "progress": False, "threads": 1},
            "teacher": {"epochs": 1, "lr": 0.05},
            "structured": {
                "runtime": "pytorch",
                "threads": 1,
                "samples": 3,
                "runs": 10,
                "max_iters": 2,
                "cache_dir": str(tmp_path / "lat"),
            },
            "measure": {"threads": 1, "warmup": 1, "runs": 3, "batch_sizes": [1], "large_batch_runs": 1},
        },
        "grid": {"seed": [0]},
        "variants": {
            "dense": {"stages": ""},
            "hybrid": {"stages": "S:1,Q:1", "grid": {"structured.budget_fraction": [0.9, 0.6]}},
        },
    }
    rows = {r["run_id"]: r for r in run_sweep(spec, tmp_path / "sweep", progress=False)}
    hybrid = sorted(k for k in rows if k.startswith("hybrid"))
    assert len(hybrid) == 2 and all(rows[k]["final_top1"] is not None for k in hybrid)
    md = build_report(tmp_path / "sweep")["markdown"].read_text()
    sec = md.split("Structured pruning: latency budgets, measured")[1].split("\n#")[0]
    lines = [line for line in sec.splitlines() if line.startswith("| hybrid")]
    assert len(lines) == 2
    budgets = sorted(line.split("|")[5].strip() for line in lines)
    assert budgets[0].startswith("0.6× dense") and budgets[1].startswith("0.9× dense")
    for line in lines:
        cells = [c.strip() for c in line.split("|")[1:-1]]
        assert cells[3] == "pytorch INT8, batch 1, 1 threads"
        assert float(cells[6]) > 0 and cells[10].endswith("%") and cells[11].endswith("%")
    assert (tmp_path / "sweep" / "plots" / "structured_digits_resnet18_w0p125.png").is_file()
