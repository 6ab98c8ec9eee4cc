import itertools
import json

import pytest
import torch

from pqd.config import RunConfig
from pqd.errors import ConfigError
from pqd.pipeline import run_pipeline

ORDERS = [",".join(f"{s}:2" for s in perm) for perm in itertools.permutations("PQD")]


def _check_common(m, cfg):
    assert m["schema"] == 1 and m["stages"] == cfg.stage_string()
    assert m["stage_order"] == [s.stage for s in cfg.stages]
    assert 0.0 <= m["accuracy"]["final_top1"] <= 1.0
    assert m["size_bytes"]["teacher_fp32"] > 0 and m["size_bytes"]["final"] > 0
    lat = {(r["model"], r["batch"]): r for r in m["latency"]}
    assert ("teacher_fp32", 1) in lat
    assert all(r["median_ms"] > 0 and r["p90_ms"] >= r["median_ms"] for r in m["latency"])


@pytest.mark.parametrize("order", ORDERS)
def test_every_stage_order_runs(order, tiny_config, tmp_path):
    cfg = RunConfig.from_dict(tiny_config | {"stages": order})
    m = run_pipeline(cfg, tmp_path)
    _check_common(m, cfg)
    assert m["final_form"] == "int8"
    assert (tmp_path / "model_int8.pt").is_file()
    assert m["sparsity"]["achieved"] == pytest.approx(0.5, abs=0.01)
    assert m["sparsity"]["achieved_int8"] >= 0.5 - 0.01
    assert m["accuracy"]["int8_vs_fake_quant_agreement"] >= 0.98
    assert m["accuracy"]["teacher_top1"] > 0.8 and m["accuracy"]["final_top1"] > 0.8
    assert json.loads((tmp_path / "metrics.json").read_text()) == m
    assert {p.name for p in (tmp_path / "stages").iterdir()} == {f"{i + 1}_{s.stage}" for i, s in enumerate(cfg.stages)}
    assert not list(tmp_path.rglob("epoch.safetensors")), "per-epoch checkpoints are removed once a stage is done"


@pytest.mark.parametrize(
    "stages, extra, form",
    [
        ("P:2", {}, "fp32"),  # prune-only (+fine-tune)
        ("D:2", {}, "fp32"),  # KD-only: dense FP32 student
        ("Q:2", {}, "int8"),  # QAT-only
        ("Q:0", {"quantize": {"mode": "ptq", "calibration_batches": 2}}, "int8"),  # static PTQ
        ("P:2,Q:2", {"prune": {"sparsity": 0.5, "criterion": "random"}}, "int8"),  # random pruning, no KD
    ],
)
def test_baselines(stages, extra, form, tiny_config, tmp_path):
    cfg = RunConfig.from_dict(tiny_config | {"stages": stages} | extra)
    m = run_pipeline(cfg, tmp_path)
    _check_common(m, cfg)
    assert m["final_form"] == form
    expected_sparsity = 0.5 if "P" in stages else 0.0
    assert m["sparsity"]["achieved"] == pytest.approx(expected_sparsity, abs=0.01)


def test_teacher_from_weights_file_and_changed_config_refused(tiny_config, tmp_path):
    first = run_pipeline(RunConfig.from_dict(tiny_config | {"stages": "P:1"}), tmp_path / "a")
    cfg = RunConfig.from_dict(tiny_config | {"stages": "Q:1", "teacher": {"epochs": 0, "weights": str(tmp_path / "a" / "teacher.safetensors")}})
    m = run_pipeline(cfg, tmp_path / "b")
    assert m["accuracy"]["teacher_top1"] == first["accuracy"]["teacher_top1"]
    with pytest.raises(ConfigError, match="different config.*prune.sparsity"):
        run_pipeline(RunConfig.from_dict(tiny_config | {"stages": "P:1", "prune": {"sparsity": 0.3}}), tmp_path / "a")


def test_rerun_of_finished_run_recomputes_nothing(tiny_config, tmp_path, monkeypatch):
    cfg = RunConfig.from_dict(tiny_config)
    m1 = run_pipeline(cfg, tmp_path)
    import pqd.pipeline as pl

    def no_training(*a, **k):
        raise AssertionError("a finished stage was recomputed")

    for name in ("train", "prune", "quantize", "distill"):
        monkeypatch.setattr(pl, name, no_training)
    m2 = run_pipeline(cfg, tmp_path)
    assert m2["accuracy"] == m1["accuracy"] and m2["sparsity"] == m1["sparsity"]


def test_latency_is_timed_in_worker_processes(tiny_config, tmp_path):
    cfg = RunConfig.from_dict(tiny_config | {"stages": "Q:1"})
    m = run_pipeline(cfg, tmp_path)
    assert {r["harness"] for r in m["latency"]} == {"worker processes"}
    assert {r["model"] for r in m["latency"]} == {"teacher_fp32", "final_int8"}
    assert all(r["runs"] == 5 and r["blocks"]["rounds"] >= 1 for r in m["latency"])


def test_a_model_workers_cannot_build_is_timed_in_process_with_a_warning(tiny_config, tmp_path, monkeypatch, caplog):
    """A model registered at run time exists only in this process: the worker cannot build
    the teacher, so the run falls back to in-process timing, says so, and loses nothing."""
    from pqd import registry
    from pqd.models.resnet import resnet18

    def only_here_resnet(num_classes=10, width=1.0, **kw):
        return resnet18(num_classes=num_classes, width=width, **kw)

    monkeypatch.setitem(registry._MODELS, "only_here_resnet", only_here_resnet)
    cfg = RunConfig.from_dict(tiny_config | {"stages": "Q:1", "model": {"name": "only_here_resnet", "width": 0.125}})
    with caplog.at_level("WARNING", logger="pqd"):
        m = run_pipeline(cfg, tmp_path)
    assert {r["harness"] for r in m["latency"]} == {"in-process"}
    assert all(r["median_ms"] > 0 for r in m["latency"])
    assert any("timing in this process instead of worker processes" in r.getMessage() and "only_here_resnet" in r.getMessage()
               for r in caplog.records)
