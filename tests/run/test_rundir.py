"""pqd.run.rundir.RunDir and pqd.run.metrics: layout, config check/resume, student save/restore, metrics merge."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from torch import nn

from pqd.compress.channels.reshape import fit_to_state_dict
from pqd.compress.qat import freeze, prepare
from pqd.compress.student import Student
from pqd.errors import CheckpointError, ConfigError
from pqd.run.config import RunConfig
from pqd.run.metrics import SCHEMA, Accuracy, LatencyRecord, Metrics, Sizes, Sparsity, StageRecord
from pqd.run.rundir import RunDir, build_model

CFG = {"stages": "P:1,P:1,Q:1", "model": {"name": "resnet18", "width": 0.125}, "teacher": {"epochs": 1}}


def test_config_check_writes_refuses_and_takes_over(tmp_path):
    run = RunDir(tmp_path / "r")
    cfg = RunConfig.from_dict(CFG)
    run.check_config(cfg)
    assert yaml.safe_load(run.config_path.read_text()) == cfg.to_dict()
    run.check_config(cfg)  # same config: resume
    other = RunConfig.from_dict(CFG | {"seed": 3, "prune": {"sparsity": 0.3}})
    run.check_config(other)  # no results yet: the new config takes over
    assert run.read_config() == other
    run.teacher_epoch_path.write_bytes(b"x")  # any result
    with pytest.raises(ConfigError, match=r"differs at: prune.sparsity, seed"):
        run.check_config(cfg)
    with pytest.raises(CheckpointError, match="not a pqd run directory"):
        RunDir(tmp_path / "none").read_config()


def test_stage_paths_are_index_based_so_repeats_do_not_collide(tmp_path):
    run = RunDir(tmp_path)
    assert run.student_path(0, "prune") != run.student_path(1, "prune")
    assert run.student_path(1, "prune") == tmp_path / "stages" / "2_prune" / "student.safetensors"
    cfg = RunConfig.from_dict(CFG)
    assert run.last_finished_stage(cfg) == -1
    run.save_student(1, "prune", Student(nn.Linear(2, 2)))
    assert run.last_finished_stage(cfg) == 1
    assert run.deployed_path(cfg) == run.int8_path
    assert RunDir(tmp_path).deployed_path(RunConfig.from_dict(CFG | {"stages": ""})) == run.teacher_path


@pytest.mark.parametrize("form", ["fp32", "qat"])
def test_student_round_trip(tmp_path, form):
    cfg = RunConfig.from_dict(CFG | {"stages": "P:1" if form == "fp32" else "P:1,Q:1"})
    torch.manual_seed(0)
    model = build_model(cfg, 4)
    if form == "qat":
        model = prepare(model, torch.zeros(2, 3, 16, 16), mode="qat")
        with torch.no_grad():
            model.train()(torch.randn(8, 3, 16, 16))  # observers see data
        freeze(model)  # as every stage ends: observers and BN statistics frozen
    masks = {"fc": torch.rand(model.get_submodule("fc").weight.shape) > 0.5}
    student = Student(model, masks, form)
    if hasattr(student, "records"):
        student.records["2_quantize"] = {"note": 1}
    run = RunDir(tmp_path)
    i = len(cfg.stages) - 1
    run.save_student(i, cfg.stages[i].stage, student)
    back = run.restore_student(cfg, i, num_classes=4, image_shape=(3, 16, 16))
    assert back.form == form and back.masks.keys() == masks.keys() and torch.equal(back.masks["fc"], masks["fc"])
    x = torch.randn(2, 3, 16, 16)
    model.eval(), back.model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), back.model(x))
    if hasattr(student, "records"):
        assert back.records == {"2_quantize": {"note": 1}}


def test_fit_to_state_dict_resizes_conv_linear_bn_and_keeps_depthwise():
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.Conv2d(8, 8, 3, groups=8, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )
    small = nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1),
        nn.BatchNorm2d(5),
        nn.Conv2d(5, 5, 3, groups=5, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, 4),
    )
    state = small.state_dict()
    assert fit_to_state_dict(net, state) is net
    assert (net[0].out_channels, net[1].num_features, net[2].in_channels, net[5].in_features) == (5, 5, 5, 5)
    net.load_state_dict(state)
    assert net[2].groups == 5
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(net.eval()(x), small.eval()(x))


def _metrics() -> Metrics:
    return Metrics(
        model="resnet18",
        width=0.125,
        dataset="digits",
        num_classes=10,
        stages="P:1,Q:1",
        stage_order=["prune", "quantize"],
        epochs={"teacher": 1, "prune": 1, "quantize": 1},
        teacher_source="trained",
        final_form="int8",
        accuracy=Accuracy(0.9, 0.8, 0.85, fake_quant_top1=0.81),
        sparsity=Sparsity(0.5, 0.5, 0.49, 20),
        size_bytes=Sizes(100, 20, "model_int8.pt", compact_int8=5, compact_file="model_int8.pqdz"),
        latency=[LatencyRecord("teacher_fp32", 1, 2.0, 2.5, {"threads": 1}), LatencyRecord("final_int8", 1, 1.0, 1.2)],
        pruned=True,
        quantize_mode="qat",
        prune_criterion="magnitude",
        stage_records=[StageRecord(0, "prune", "P", 1), StageRecord(1, "quantize", "Q", 1, quantizes=True)],
    )


def test_metrics_round_trip_merge_and_fields(tmp_path):
    m = _metrics()
    d = m.to_dict()
    assert d["schema"] == SCHEMA == 4 and Metrics.from_dict(d) == m and json.loads(json.dumps(d)) == d
    assert m.stage_label == "P>Q" and m.final_model_name == "final_int8" and m.median_ms("final_int8", 1) == 1.0
    run = RunDir(tmp_path)
    run.merge_metrics(bench={"x": 1})  # no metrics.json yet: nothing to merge into
    assert run.read_metrics() is None
    run.write_metrics(m)
    run.merge_metrics(bench={"x": 1})
    written = run.write_metrics(m)  # re-measuring keeps what `pqd bench` added
    assert written["bench"] == {"x": 1} and run.metrics().extra == {"bench": {"x": 1}}


def test_metrics_carry_the_latency_environment_and_older_files_read_without_it():
    env = {
        "inherited": False,
        "variables": {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": None},
        "ignored_from_caller": {"OMP_WAIT_POLICY": "PASSIVE"},
        "policy": "controlled",
        "harness": "worker processes",
    }
    m = _metrics()
    m.latency_env = env
    d = m.to_dict()
    assert d["latency_env"] == env and Metrics.from_dict(json.loads(json.dumps(d))) == m
    schema3 = {k: v for k, v in d.items() if k != "latency_env"} | {"schema": 3}
    old = Metrics.from_dict(schema3)
    assert old.latency_env is None and old.schema == 3 and "latency_env" not in old.extra


@pytest.mark.parametrize("schema", [1, 2, None])
def test_metrics_of_an_older_schema_are_refused_with_what_to_do(schema):
    old = {
        "schema": schema,
        "model": "resnet18",
        "dataset": "digits",
        "stages": "P:1,Q:2",
        "final_form": "int8",
        "accuracy": {"teacher_top1": 0.9, "final_top1": 0.8, "fake_quant_top1": 0.8},
        "sparsity": {"target": 0.5, "achieved": 0.5},
        "size_bytes": {"teacher_fp32": 1, "final": 1, "final_file": "x"},
        "latency": [{"model": "teacher_fp32", "batch": 1, "median_ms": 2.0}],
    }
    with pytest.raises(CheckpointError, match=f"schema {schema!r}.*reads schemas 3.*pqd run"):
        Metrics.from_dict(old)


def test_a_lower_lr_for_an_unfinished_stage_resumes_and_restarts_only_that_stage(tmp_path):
    """After divergence the remedy is a lower lr: accepted for a stage that has not finished; its
    partial epoch checkpoint and later stages restart, the teacher and finished stages are kept."""
    cfg = {"stages": "P:1,Q:1,D:1", "model": {"name": "resnet18", "width": 0.125}, "teacher": {"epochs": 1}}
    run = RunDir(tmp_path / "r")
    run.check_config(RunConfig.from_dict(cfg))
    names = ["prune", "quantize", "distill"]
    done = [run.teacher_path, run.student_path(0, "prune")]
    partial = run.stage_epoch_path(1, "quantize")
    for p in done + [partial]:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    lower = RunConfig.from_dict(cfg | {"quantize": {"lr": 0.0005}})
    run.check_config(lower)
    assert yaml.safe_load(run.config_path.read_text())["quantize"]["lr"] == 0.0005
    assert all(p.read_bytes() == b"x" for p in done) and not partial.exists()
    with pytest.raises(ConfigError, match=r"different config \(differs at: prune.lr\)"):  # a finished stage
        run.check_config(RunConfig.from_dict(cfg | {"quantize": {"lr": 0.0005}, "prune": {"lr": 0.001}}))
    with pytest.raises(ConfigError, match=r"differs at: distill.lr, prune.sparsity"):  # not only an lr
        run.check_config(
            RunConfig.from_dict(
                cfg | {"quantize": {"lr": 0.0005}, "distill": {"lr": 0.001}, "prune": {"sparsity": 0.3}}
            )
        )
    with pytest.raises(ConfigError, match="teacher.lr"):  # the teacher finished
        run.check_config(RunConfig.from_dict(cfg | {"quantize": {"lr": 0.0005}, "teacher": {"lr": 0.01}}))
    assert names and run.student_path(0, "prune").exists()
