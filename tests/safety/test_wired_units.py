"""The safety checks as wired into pqd, in process and fast: resume comparison, checkpoint errors and
the sweep table, leaf modules for the FX tracer, no code from disk."""

from __future__ import annotations

import os
import sqlite3

import pytest
import torch
from torch import nn

from pqd.errors import CheckpointError, DataError, DiskFullError, ModelError, UntrustedCodeError
from pqd.run.config import RunConfig
from pqd.run.rundir import RunDir, comparable_config
from pqd.train.checkpoint import load_checkpoint, save_checkpoint

TINY = {
    "stages": "P:1,D:1",
    "model": {"name": "resnet18", "width": 0.125},
    "data": {"dataset": "digits", "train_subset": 100, "test_subset": 50},
    "teacher": {"epochs": 1},
}


def test_resume_ignores_missing_keys_and_result_neutral_settings(tmp_path):
    cfg = RunConfig.from_dict(TINY)
    old = cfg.to_dict()
    del old["quantize"]["reduce_range"]  # written by an older pqd that lacked this key
    old["train"]["progress"] = not old["train"]["progress"]
    old["measure"]["runs"] = 7
    assert comparable_config(old) == comparable_config(cfg.to_dict())
    run = RunDir(tmp_path)
    import yaml

    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    (tmp_path / "teacher.safetensors").write_bytes(b"x")  # "has results"
    run.check_config(cfg)  # no error: a harmless difference
    changed = RunConfig.from_dict(TINY | {"prune": {"sparsity": 0.8}})
    with pytest.raises(Exception, match="prune.sparsity"):
        run.check_config(changed)


def test_sweep_teacher_path_relative_and_old_absolute(tmp_path):
    teacher = tmp_path / "runs" / "teacher-abc123" / "teacher.safetensors"
    teacher.parent.mkdir(parents=True)
    teacher.write_bytes(b"x")
    rel = RunConfig.from_dict(TINY | {"teacher": {"weights": "runs/teacher-abc123/teacher.safetensors"}}).to_dict()
    old = RunConfig.from_dict(TINY | {"teacher": {"weights": str(teacher)}}).to_dict()
    moved = RunConfig.from_dict(
        TINY | {"teacher": {"weights": "/elsewhere/sw/runs/teacher-abc123/teacher.safetensors"}}
    ).to_dict()
    assert comparable_config(old, teacher_base=tmp_path) == comparable_config(rel, teacher_base=tmp_path)
    assert comparable_config(moved, teacher_base=tmp_path) == comparable_config(rel, teacher_base=tmp_path)
    other = RunConfig.from_dict(TINY | {"teacher": {"weights": "runs/teacher-zzz999/teacher.safetensors"}}).to_dict()
    assert comparable_config(other, teacher_base=tmp_path) != comparable_config(rel, teacher_base=tmp_path)


def test_malformed_checkpoint_metadata_is_a_checkpoint_error(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "c.safetensors"
    save_file({"a": torch.zeros(2)}, str(p), metadata={"pqd": "{not json"})
    with pytest.raises(CheckpointError, match="malformed pqd metadata"):
        load_checkpoint(p)


def test_wrong_stage_checkpoint_is_a_short_message(tmp_path):
    cfg = RunConfig.from_dict(TINY)
    run = RunDir(tmp_path)
    save_checkpoint(run.student_path(0, "prune"), {"model.foo.weight": torch.zeros(3)}, {"form": "fp32"})
    with pytest.raises(CheckpointError) as err:
        run.restore_student(cfg, 0, num_classes=10, image_shape=(3, 32, 32))
    msg = str(err.value)
    assert (
        "missing key" in msg
        and "unexpected key" in msg
        and "another model's tensors" in msg
        and "delete" not in msg
        and len(msg) < 1500
    )


def test_sqlite_disk_full_is_a_storage_error(tmp_path, monkeypatch):
    from pqd.commands import sweep

    table = sweep.ResultTable(tmp_path / "results.sqlite")

    def full(*a, **k):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(sweep.sqlite3, "connect", full)
    with pytest.raises(DiskFullError):
        table.upsert({"run_id": "x"})


def test_garbled_config_in_a_sweep_run_is_not_finished(tmp_path):
    from pqd.commands.sweep import expand, finished_metrics, run_dir

    sw = expand({"base": TINY, "variants": {"a": {"stages": "P:1"}}}, tmp_path)
    run = [r for r in sw.runs if r.kind == "pipeline"][0]
    d = run_dir(tmp_path, run)
    d.mkdir(parents=True)
    (d / "metrics.json").write_text("{}")
    (d / "config.yaml").write_bytes(b"seed: [\xff")
    assert finished_metrics(tmp_path, run) is None


def test_symlink_loop_in_image_folder_is_a_data_error(tmp_path):
    from pqd.data.folder import read_image_folder

    for split in ("train", "test"):
        (tmp_path / split / "a").mkdir(parents=True)
        os.symlink("loop.png", tmp_path / split / "a" / "loop.png")
    with pytest.raises(DataError):
        read_image_folder(tmp_path)


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            return self.conv(x)
        return -self.conv(x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 3, 3, padding=1)
        self.block = Branchy()
        self.head = nn.Linear(3, 4)

    def forward(self, x):
        return self.head(self.block(self.stem(x)).mean((2, 3)))


def test_leaf_modules_make_an_untraceable_model_quantizable():
    from pqd.compress.qat import prepare

    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ModelError, match="quantize.leaf_modules"):
        prepare(Net(), x, mode="ptq")
    prepared = prepare(Net(), x, mode="ptq", leaf_modules=["block"])
    assert prepared(x).shape == (2, 4)
    prepared = prepare(Net(), x, mode="ptq", leaf_modules=[f"{__name__}:Branchy"])
    assert prepared(x).shape == (2, 4)
    cfg = RunConfig.from_dict(TINY | {"quantize": {"leaf_modules": ["layer1.0"]}})
    assert cfg.quantize.leaf_modules == ("layer1.0",)


def test_leaf_class_from_disk_needs_allow_code():
    from pqd.safety.trustpolicy import check_config_code

    cfg = RunConfig.from_dict(TINY | {"quantize": {"leaf_modules": ["evil.mod:Block"]}})
    with pytest.raises(UntrustedCodeError):
        check_config_code(cfg, allow_code=False, source="config.yaml")
    check_config_code(cfg, allow_code=True)
    check_config_code(RunConfig.from_dict(TINY | {"quantize": {"leaf_modules": ["layer1.0"]}}), allow_code=False)


def test_peer_run_config_gets_defaults_filled_too():
    # a sweep's peer run stores {"peer": ...} beside the RunConfig; a key added to pqd after the run
    # finished must not make its resume fail (seen: structured.margin on a finished nncf_ptq run)
    cfg = RunConfig.from_dict(TINY | {"stages": ""})
    new = cfg.to_dict() | {"peer": "nncf_ptq"}
    old = cfg.to_dict() | {"peer": "nncf_ptq"}
    del old["structured"]["margin"]
    assert comparable_config(old) == comparable_config(new)
    assert comparable_config(old) != comparable_config(cfg.to_dict() | {"peer": "other"})
