"""The S stage checks before training that its target runtime takes the model's INT8 form."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from structured_user_models import LayerScaleNet

import pqd.structured.latency_model as L
from pqd.errors import ModelError
from pqd.run.config import load_config
from pqd.run.pipeline import run_pipeline

HERE = Path(__file__).resolve().parent


@pytest.fixture()
def standin(monkeypatch):
    """Point the runtime check at a stand-in probe of tests/structured/runtime_standins.py."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))

    def use(name: str) -> None:
        monkeypatch.setattr(L, "RUNTIME_PROBE", f"runtime_standins:{name}")

    return use


def test_a_static_batch_crash_falls_back_to_a_dynamic_batch(standin, caplog):
    standin("probe_segv_static")
    target = L.Target("openvino", 1, 1)
    assert L.check_runtime(LayerScaleNet().eval(), target=target, input_shape=(3, 16, 16)) == {"batch_shape": "dynamic"}
    assert any("SIGSEGV" in r.getMessage() and "dynamic batch" in r.getMessage() for r in caplog.records)


def test_a_runtime_that_cannot_take_the_model_names_runtime_operation_and_alternative(standin):
    standin("probe_refuses")
    with pytest.raises(ModelError) as err:
        L.check_runtime(LayerScaleNet().eval(), target=L.Target("openvino", 1, 1), input_shape=(3, 16, 16))
    msg = str(err.value)
    assert "OpenVINO" in msg and "[MultiplyPartialTransformation] Shape index '0' out of range" in msg
    assert "structured.runtime: onnxruntime" in msg and "before training" in msg
    assert "\x1b" not in msg and "dump line" not in msg and len(msg) < 600


def test_a_crash_at_every_batch_shape_names_the_signal(standin):
    standin("probe_segv_always")
    with pytest.raises(
        ModelError, match=r"OpenVINO cannot run this model's INT8 form \(it crashed with SIGSEGV\).*onnxruntime"
    ):
        L.check_runtime(LayerScaleNet().eval(), target=L.Target("openvino", 1, 1), input_shape=(3, 16, 16))


def test_the_run_stops_before_the_teacher_trains(standin, tmp_path):
    standin("probe_refuses")
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text("""
seed: 0
stages: "S:1,Q:1"
model: {name: 'structured_user_models:layer_scale', width: 1.0}
data: {dataset: digits, train_subset: 256, test_subset: 64}
train: {batch_size: 32, progress: false}
teacher: {epochs: 1, lr: 0.05}
structured: {budget_fraction: 0.5, runtime: openvino, threads: 1, samples: 3, runs: 10, max_iters: 3}
""")
    config = load_config(cfg_path, [f"structured.cache_dir={tmp_path / 'lat'}"])
    with pytest.raises(ModelError, match=r"MultiplyPartialTransformation.*structured.runtime: onnxruntime"):
        run_pipeline(config, tmp_path / "run")
    assert not list((tmp_path / "run").glob("teacher*.safetensors"))


def test_pytorch_needs_no_check():
    assert L.check_runtime(LayerScaleNet().eval(), target=L.Target("pytorch", 1, 1), input_shape=(3, 16, 16)) == {}
