"""The structured stage inside the ordered pipeline: S → P → Q runs, the smaller INT8 model is
deployed, and a finished run is rebuilt from disk (shapes from the structural stage's output)."""

from __future__ import annotations

import pytest
import torch

import pqd.structured.latency_model as L
import pqd.structured.search as S
from pqd.run.config import load_config
from pqd.run.loader import load_run
from pqd.run.pipeline import run_pipeline
from pqd.run.rundir import RunDir

TINY = """
seed: 0
stages: "S:1,P:1,Q:1"
model: {name: resnet18, width: 0.125}
data: {dataset: digits, train_subset: 256, test_subset: 64}
train: {batch_size: 32, progress: false}
teacher: {epochs: 1, lr: 0.05}
prune: {sparsity: 0.5}
structured: {budget_fraction: 0.9, runtime: pytorch, threads: 1, samples: 3, runs: 10, max_iters: 3}
measure: {threads: 1, warmup: 2, runs: 5, batch_sizes: [1], large_batch_runs: 2}
"""


def test_structured_then_quantized_run_deploys_and_rebuilds(tmp_path, monkeypatch):
    real = L.measure_int8
    in_process = lambda *a, **k: real(*a, **{**k, "in_process": True})  # noqa: E731  (no worker processes in a unit test)
    monkeypatch.setattr(L, "measure_int8", in_process)
    monkeypatch.setattr(S, "measure_int8", in_process)
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(TINY)
    config = load_config(cfg_path, [f"structured.cache_dir={tmp_path / 'lat'}"])
    metrics = run_pipeline(config, tmp_path / "run")
    rec = next(r for r in metrics["stage_records"] if r["stage"] == "structured")["records"]
    assert rec["widths"] and sum(rec["widths"].values()) < sum(rec["dense_widths"].values())
    assert metrics["final_form"] == "int8"

    loaded = load_run(tmp_path / "run")
    x = torch.zeros(1, *loaded.data.image_shape)
    # the rebuilt student has the pruned (smaller) shapes and predicts like the deployed file
    teacher_params = sum(p.numel() for p in loaded.teacher.parameters())
    student_params = sum(p.numel() for p in loaded.student.model.parameters())
    assert student_params < teacher_params
    assert loaded.deployed(x).shape == (1, 10)


@pytest.mark.slow
def test_run_with_pruned_layer_scale_parameters_reloads_and_resumes(tmp_path, monkeypatch):
    """A bare per-channel parameter (ConvNeXt-style layer scale) pruned with its channels: the run
    is rebuilt from disk (export/bench load it), and a re-run resumes from the saved S output."""
    real = L.measure_int8
    in_process = lambda *a, **k: real(*a, **{**k, "in_process": True})  # noqa: E731
    monkeypatch.setattr(L, "measure_int8", in_process)
    monkeypatch.setattr(S, "measure_int8", in_process)
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(
        TINY.replace("S:1,P:1,Q:1", "S:1,Q:1")
        .replace("{name: resnet18, width: 0.125}", "{name: 'structured_user_models:layer_scale', width: 1.0}")
        .replace("budget_fraction: 0.9", "budget_fraction: 0.5")
    )
    config = load_config(cfg_path, [f"structured.cache_dir={tmp_path / 'lat'}"])
    metrics = run_pipeline(config, tmp_path / "run")
    assert metrics["final_form"] == "int8"
    run = RunDir(tmp_path / "run")
    saved = run.structural_state(config)
    assert saved["blocks.0.gamma"].shape[0] < 16  # the layer scale was pruned with its channels

    loaded = load_run(run.path, allow_code=True)
    assert loaded.student.model.state_dict()["blocks.0.gamma"].shape == saved["blocks.0.gamma"].shape
    assert loaded.deployed(torch.zeros(1, *loaded.data.image_shape)).shape == (1, 10)

    # resume: the Q stage's output is gone, so the S output is restored and Q is recomputed
    (run.student_path(1, "quantize")).unlink()
    again = run_pipeline(config, tmp_path / "run")
    assert again["final_form"] == "int8"
