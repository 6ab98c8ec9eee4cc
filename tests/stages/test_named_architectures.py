"""torchvision / timm architectures by name through S, P, Q, D, export and pqd predict, on a small
image folder of mixed sizes and modes at data.image_size 32 (width-reduced where the model has a
width multiplier)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import pqd.structured.latency_model as L
import pqd.structured.search as S
from pqd.commands.export import export_run
from pqd.commands.predict import load_deployable, predict_files
from pqd.run.config import load_config
from pqd.run.loader import load_run
from pqd.run.pipeline import run_pipeline

try:  # a torchvision built for another torch raises RuntimeError on import: skip, as for a missing one
    import timm  # noqa: F401
    import torchvision  # noqa: F401
except (ImportError, RuntimeError) as exc:
    pytest.skip(f"torchvision/timm not importable: {exc}", allow_module_level=True)

_spec = importlib.util.spec_from_file_location("mixedfolder", Path(__file__).parents[1] / "data" / "mixedfolder.py")
mixedfolder = importlib.util.module_from_spec(_spec)
sys.modules["mixedfolder"] = mixedfolder
_spec.loader.exec_module(mixedfolder)

CONFIG = """
seed: 0
stages: "S:1,P:1,Q:1,D:1"
model: {{name: "{name}", width: {width}}}
data: {{dataset: folder, root: "{root}", image_size: 32, workers: 0, val_fraction: 0.2}}
train: {{batch_size: 8, eval_batch_size: 64, progress: false}}
teacher: {{epochs: 1, lr: 0.02}}
prune: {{sparsity: 0.5}}
structured: {{budget_fraction: 0.9, runtime: {runtime}, threads: 1, samples: 2, runs: 5, max_iters: 1, select_images: 16}}
measure: {{threads: 1, warmup: 1, runs: 3, batch_sizes: [1], large_batch_runs: 1}}
"""

ARCHS = [
    pytest.param("torchvision:mobilenet_v2", 0.25, "onnxruntime", id="mobilenet_v2"),
    pytest.param("torchvision:mobilenet_v3_small", 0.25, "pytorch", id="mobilenet_v3_small", marks=pytest.mark.slow),
    pytest.param("torchvision:resnet18", 1.0, "pytorch", id="resnet18", marks=pytest.mark.slow),
    pytest.param("torchvision:resnet50", 1.0, "pytorch", id="resnet50", marks=pytest.mark.slow),
    pytest.param("timm:test_efficientnet", 1.0, "pytorch", id="timm_efficientnet", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name, width, runtime", ARCHS)
def test_architecture_through_stages_export_and_predict(tmp_path, monkeypatch, name, width, runtime):
    if runtime == "pytorch":  # time the PyTorch INT8 candidates in this process: no worker start-ups
        real = L.measure_int8
        in_process = lambda *a, **k: real(*a, **{**k, "in_process": True})  # noqa: E731
        monkeypatch.setattr(L, "measure_int8", in_process)
        monkeypatch.setattr(S, "measure_int8", in_process)
    root = tmp_path / "imgs"
    test_files = mixedfolder.write_mixed_folder(root, n_train=6, n_test=3)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(CONFIG.format(name=name, width=width, root=root, runtime=runtime))
    config = load_config(cfg, [f"structured.cache_dir={tmp_path / 'lat'}", f"data.cache_dir={tmp_path / 'cache'}"])
    run = tmp_path / "run"
    metrics = run_pipeline(config, run)
    assert metrics["final_form"] == "int8"
    rec = next(r for r in metrics["stage_records"] if r["stage"] == "structured")["records"]
    assert rec["widths"]

    # pqd predict on the image files = the run's own predictions on its evaluation tensors
    want = np.load(run / "predictions.npy")
    got = [r["top"][0]["index"] for r in predict_files(run / "model_int8.pt", test_files)]
    assert got == want.tolist()

    record = export_run(run, runtimes=("onnxruntime",))
    assert (run / "model_int8.onnx").is_file() and record
    onnx_pred = [r["top"][0]["index"] for r in predict_files(run / "model_int8.onnx", test_files)]
    # the ONNX file on the run's own uint8 evaluation tensors gives the same answers
    data = load_run(run).data
    assert onnx_pred == load_deployable(run / "model_int8.onnx").run(data.test.x).argmax(1).tolist()
    meta = torch.jit.load(str(run / "model_int8.pt")).class_names
    assert list(meta) == list(mixedfolder.CLASSES)
