"""The structured stage inside the ordered pipeline: S → P → Q runs, the smaller INT8 model is
deployed, and a finished run is rebuilt from disk (shapes from the structural stage's output)."""

from __future__ import annotations

import torch

import pqd.structured.latency_model as L
import pqd.structured.search as S
from pqd.run.config import load_config
from pqd.run.pipeline import run_pipeline
from pqd.run.loader import load_run

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
