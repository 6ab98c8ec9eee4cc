import itertools
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from pqd.errors import ConfigError
from pqd.run.config import RunConfig
from pqd.run.pipeline import build_model, measure_run_latency, run_pipeline

ORDERS = [",".join(f"{s}:1" for s in perm) for perm in itertools.permutations("PQD")]


def _check_common(m, cfg):
    assert m["schema"] == 4 and m["stages"] == cfg.stage_string()
    assert m["stage_order"] == [s.stage for s in cfg.stages]
    assert 0.0 <= m["accuracy"]["final_top1"] <= 1.0
    assert m["size_bytes"]["teacher_fp32"] > 0 and m["size_bytes"]["final"] > 0
    lat = {(r["model"], r["batch"]): r for r in m["latency"]}
    assert ("teacher_fp32", 1) in lat
    assert all(r["median_ms"] > 0 and r["p90_ms"] >= r["median_ms"] for r in m["latency"])


@pytest.mark.slow
@pytest.mark.parametrize("order", ORDERS)
def test_every_stage_order_runs(order, tiny_config, tiny_teacher, finished_run):
    cfg = RunConfig.from_dict(tiny_config | {"teacher": tiny_teacher, "stages": order})
    m, out = finished_run(cfg)
    _check_common(m, cfg)
    assert m["final_form"] == "int8"
    assert (out / "model_int8.pt").is_file()
    assert m["sparsity"]["achieved"] == pytest.approx(0.5, abs=0.01)
    assert m["sparsity"]["achieved_int8"] >= 0.5 - 0.01
    assert m["accuracy"]["int8_vs_fake_quant_agreement"] >= 0.98
    assert m["accuracy"]["teacher_top1"] > 0.8 and m["accuracy"]["final_top1"] > 0.8
    assert json.loads((out / "metrics.json").read_text()) == m
    assert {p.name for p in (out / "stages").iterdir()} == {f"{i + 1}_{s.stage}" for i, s in enumerate(cfg.stages)}
    assert not list(out.rglob("epoch.safetensors")), "per-epoch checkpoints are removed once a stage is done"


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
def test_baselines(stages, extra, form, tiny_config, tiny_teacher, tmp_path):
    cfg = RunConfig.from_dict(tiny_config | {"teacher": tiny_teacher, "stages": stages} | extra)
    m = run_pipeline(cfg, tmp_path)
    _check_common(m, cfg)
    assert m["final_form"] == form
    expected_sparsity = 0.5 if "P" in stages else 0.0
    assert m["sparsity"]["achieved"] == pytest.approx(expected_sparsity, abs=0.01)


def test_teacher_from_weights_file_and_changed_config_refused(tiny_config, tiny_teacher, finished_run, tmp_path):
    first, a = finished_run(RunConfig.from_dict(tiny_config | {"teacher": tiny_teacher, "stages": "P:1"}))
    cfg = RunConfig.from_dict(
        tiny_config | {"stages": "Q:1", "teacher": {"epochs": 0, "weights": str(a / "teacher.safetensors")}}
    )
    m = run_pipeline(cfg, tmp_path / "b")
    assert m["accuracy"]["teacher_top1"] == first["accuracy"]["teacher_top1"]
    shutil.copytree(a, tmp_path / "a")
    with pytest.raises(ConfigError, match="different config.*prune.sparsity"):
        run_pipeline(
            RunConfig.from_dict(tiny_config | {"teacher": tiny_teacher, "stages": "P:1", "prune": {"sparsity": 0.3}}),
            tmp_path / "a",
        )


def test_rerun_of_finished_run_recomputes_nothing(tiny_config, tiny_teacher, finished_run, tmp_path, monkeypatch):
    cfg = RunConfig.from_dict(tiny_config | {"teacher": tiny_teacher, "stages": ORDERS[0]})
    m1, done = finished_run(cfg)
    shutil.copytree(done, tmp_path, dirs_exist_ok=True)

    def no_training(*a, **k):
        raise AssertionError("a finished stage was recomputed")

    # the functions the stage adapters and the teacher step call (looked up at call time)
    for module, name in (
        ("pqd.run.pipeline", "train"),
        ("pqd.stages.prune", "prune"),
        ("pqd.stages.quantize", "quantize"),
        ("pqd.stages.distill", "distill"),
        ("pqd.train.loop", "train"),
    ):
        monkeypatch.setattr(sys.modules[module], name, no_training)
    m2 = run_pipeline(cfg, tmp_path)
    assert m2["accuracy"] == m1["accuracy"] and m2["sparsity"] == m1["sparsity"]


def test_latency_is_timed_in_worker_processes(tiny_config, tiny_teacher, finished_run):
    cfg = RunConfig.from_dict(tiny_config | {"teacher": tiny_teacher, "stages": "Q:1"})
    m, _ = finished_run(cfg)
    assert {r["harness"] for r in m["latency"]} == {"worker processes"}
    assert {r["model"] for r in m["latency"]} == {"teacher_fp32", "final_int8"}
    assert all(r["runs"] == 5 and r["blocks"]["rounds"] >= 1 for r in m["latency"])
    # the pipeline's own ratio is PyTorch eager FP32 vs TorchScript INT8: a labelled extra, never "same runtime"
    assert {(r["runtime"], r["precision"]) for r in m["latency"]} == {("pytorch", "fp32"), ("pytorch", "int8")}
    sp = m["speedup"]
    assert sp["same_runtime"] == [] and sp["pytorch_eager_extra"]
    extra = sp["pytorch_eager_extra"][0]
    assert extra["kind"] == "pytorch_eager_vs_compiled"
    assert "PyTorch eager" in extra["numerator"] and "TorchScript" in extra["denominator"]


def test_accuracy_carries_intervals_test_set_and_prediction_files(tiny_config, tiny_teacher, finished_run, int8_run):
    import numpy as np

    from pqd.data import load_data
    from pqd.run.rundir import RunDir

    cfg = RunConfig.from_dict(tiny_config | {"teacher": tiny_teacher, "stages": "Q:1"})
    m, out = finished_run(cfg)
    acc = m["accuracy"]
    assert acc["test_n"] == 200 and acc["test_full_split"] is False and acc["test_subset_seed"] == 0
    for key in ("teacher_top1", "final_top1", "fake_quant_top1"):
        ci = acc[f"{key}_ci"]
        assert ci["top1"] == pytest.approx(acc[key]) and ci["n"] == 200 and ci["method"] == "wilson"
        assert ci["ci_low"] < acc[key] < ci["ci_high"] or acc[key] in (0.0, 1.0)
    run = RunDir(out)
    y = load_data(cfg.data, seed=cfg.seed).test.y.numpy()
    final, teacher = run.load_predictions(), run.load_predictions(teacher=True)
    assert final.dtype == np.int16 and final.shape == (200,) and acc["predictions_file"] == "predictions.npy"
    assert (final == y).mean() == pytest.approx(acc["final_top1"])
    assert (teacher == y).mean() == pytest.approx(acc["teacher_top1"])
    assert (run.load_predictions(labels=True) == y).all()
    # a run without data.test_subset (the shared int8_run) is evaluated on the whole test split
    full = RunDir(int8_run).read_config()
    assert full.data.test_subset is None
    acc = json.loads((int8_run / "metrics.json").read_text())["accuracy"]
    assert (
        acc["test_full_split"] is True
        and acc["test_n"] == len(load_data(full.data).test)
        and "test_subset_seed" not in acc
    )


def test_a_model_workers_cannot_build_is_timed_in_process_with_a_warning(
    tiny_config, tiny_teacher, monkeypatch, caplog
):
    """A model registered at run time exists only in this process: the worker cannot build
    the teacher, so the run's latency step falls back to in-process timing, says so, and loses nothing."""
    from pqd.data import load_data
    from pqd.models import registry
    from pqd.models.resnet import resnet18
    from pqd.train.checkpoint import load_weights

    def only_here_resnet(num_classes=10, width=1.0, **kw):
        return resnet18(num_classes=num_classes, width=width, **kw)

    monkeypatch.setitem(registry._MODELS, "only_here_resnet", only_here_resnet)
    cfg = RunConfig.from_dict(
        tiny_config | {"teacher": tiny_teacher, "stages": "Q:1", "model": {"name": "only_here_resnet", "width": 0.125}}
    )
    data = load_data(cfg.data, seed=cfg.seed)
    teacher = build_model(cfg, data.num_classes)
    teacher.load_state_dict(load_weights(tiny_teacher["weights"]))
    weights = Path(tiny_teacher["weights"])
    with caplog.at_level("WARNING", logger="pqd"):
        lat, env = measure_run_latency(
            cfg,
            data,
            teacher=teacher.eval(),
            teacher_path=weights,
            deployed=teacher,
            deployed_path=weights,
            final_name="final_fp32",
        )
    assert {r["model"] for r in lat} == {"teacher_fp32", "final_fp32"}
    assert {r["harness"] for r in lat} == {"in-process"}
    assert all(r["median_ms"] > 0 for r in lat)
    # timed under this process's own environment, and recorded as such
    assert env["harness"] == "in-process" and env["inherited"] is True
    assert any(
        "timing in this process instead of worker processes" in r.getMessage() and "only_here_resnet" in r.getMessage()
        for r in caplog.records
    )


def test_rerun_guard_catches_a_recomputed_stage(tiny_config, tiny_teacher, finished_run, tmp_path, monkeypatch):
    """The guard of the test above can fail: a stage whose output was deleted is recomputed and trips it."""
    cfg = RunConfig.from_dict(tiny_config | {"teacher": tiny_teacher, "stages": "P:1"})
    _, done = finished_run(cfg)
    shutil.copytree(done, tmp_path, dirs_exist_ok=True)
    shutil.rmtree(tmp_path / "stages")

    def no_training(*a, **k):
        raise AssertionError("recomputed")

    monkeypatch.setattr(sys.modules["pqd.stages.prune"], "prune", no_training)
    with pytest.raises(AssertionError, match="recomputed"):
        run_pipeline(cfg, tmp_path)


def test_repeated_stages_and_typed_stage_records(tiny_config, tiny_teacher, tmp_path):
    cfg = RunConfig.from_dict(
        tiny_config | {"teacher": tiny_teacher, "stages": "P:1,P:1", "prune": {"sparsity": 0.5, "schedule": "oneshot"}}
    )
    m = run_pipeline(cfg, tmp_path)
    assert m["stages"] == "P:1,P:1" and m["stage_order"] == ["prune", "prune"]
    assert {p.name for p in (tmp_path / "stages").iterdir()} == {"1_prune", "2_prune"}
    assert [(r["index"], r["stage"], r["letter"]) for r in m["stage_records"]] == [(0, "prune", "P"), (1, "prune", "P")]
    assert m["pruned"] and m["prune_criterion"] == "magnitude" and m["quantize_mode"] is None
    assert m["sparsity"]["achieved"] == pytest.approx(0.5, abs=0.01)
    from pqd.run.metrics import Metrics

    assert Metrics.from_dict(m).to_dict() == m


def test_dense_run_goes_through_the_same_pipeline(tiny_config, tiny_teacher, tmp_path):
    cfg = RunConfig.from_dict(tiny_config | {"teacher": tiny_teacher, "stages": ""})
    m = run_pipeline(cfg, tmp_path)
    assert m["stages"] == "" and m["stage_order"] == [] and m["final_form"] == "fp32" and not m["pruned"]
    assert m["accuracy"]["final_top1"] == m["accuracy"]["teacher_top1"]
    assert m["accuracy"]["final_vs_teacher_agreement"] == 1.0
    assert {r["model"] for r in m["latency"]} == {"teacher_fp32", "final_fp32"}
    assert {r["harness"] for r in m["latency"]} == {"worker processes"}  # the harness of every other run
    assert m["size_bytes"]["final_file"] == "teacher.safetensors"  # the dense model is the teacher's own file
    assert not (tmp_path / "stages").exists() and not (tmp_path / "model_fp32.safetensors").exists()


def test_a_new_stage_is_one_registration(tiny_config, tiny_teacher, tmp_path):
    """A stage defined here, registered once, runs in the pipeline by letter; its records reach metrics.json."""
    from pqd.stages.protocol import Stage, register_stage, unregister_stage

    calls = []

    class Identity(Stage):
        name, letter = "identity", "I"

        def run(self, student, section_config, ctx, *, epochs, checkpoint):
            calls.append((ctx.index, epochs, str(ctx.device), section_config))
            student.records[f"{ctx.index + 1}_identity"] = {"seen": True}
            return student

    register_stage(Identity())
    try:
        cfg = RunConfig.from_dict(tiny_config | {"teacher": tiny_teacher, "stages": "I:0,Q:1,I:3"})
        assert cfg.stage_string() == "I:0,Q:1,I:3"
        m = run_pipeline(cfg, tmp_path)
    finally:
        unregister_stage("identity")
    assert calls == [(0, 0, "cpu", None), (2, 3, "cpu", None)]
    assert m["stage_order"] == ["identity", "quantize", "identity"] and m["final_form"] == "int8"
    assert (tmp_path / "stages" / "3_identity" / "student.safetensors").is_file()
    with pytest.raises(ConfigError, match="unknown stage 'I'"):
        RunConfig.from_dict(tiny_config | {"teacher": tiny_teacher, "stages": "I:0"})


def test_stage_list_validation():
    with pytest.raises(ConfigError, match="quantizes 2 times"):
        RunConfig.from_dict({"stages": "Q:1,D:1,Q:1"})

    # the built-in structural stage (S, structured pruning) must come before any quantizing stage
    with pytest.raises(ConfigError, match="structural stages must come before any quantizing stage, e.g. S:1,Q:1,D:1"):
        RunConfig.from_dict({"stages": "Q:1,S:1,D:1"})
    assert RunConfig.from_dict({"stages": "S:1,Q:1,D:1"}).stage_string() == "S:1,Q:1,D:1"
    assert RunConfig.from_dict({"stages": []}).stages == ()
    assert [
        s.stage
        for s in RunConfig.from_dict({"stages": [{"stage": "P", "epochs": 1}, {"stage": "kd", "epochs": 1}]}).stages
    ] == ["prune", "distill"]


def test_latency_is_timed_in_the_controlled_environment_unless_inherit_env(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # as advised for training processes side by side
    cfg = tiny_config | {"stages": "", "teacher": {"epochs": 1, "lr": 0.05}}
    for inherit in (False, True):
        out = tmp_path / f"inherit-{inherit}"
        m = run_pipeline(RunConfig.from_dict(cfg | {"measure": tiny_config["measure"] | {"inherit_env": inherit}}), out)
        env = m["latency_env"]
        assert env["inherited"] is inherit and env["harness"] == "worker processes"
        assert env["variables"]["OMP_WAIT_POLICY"] == ("PASSIVE" if inherit else None)
        assert env["variables"]["OMP_NUM_THREADS"] == ("1" if not inherit else os.environ.get("OMP_NUM_THREADS"))
        assert ("OMP_WAIT_POLICY" in env["ignored_from_caller"]) is not inherit
        assert json.loads((out / "env.json").read_text())["latency_env"] == env
