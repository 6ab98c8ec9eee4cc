"""Reproducibility: the same command on the same machine gives the same metrics, and what pqd
deploys is exactly what it saved (a prune -> PTQ run included)."""

from __future__ import annotations

import subprocess

import pytest
import torch
from rbhelpers import cli_env, pqd_cmd, read_metrics, tiny, write_config

from pqd.compress.qat import prepare
from pqd.compress.student import Student, convert_student
from pqd.models.registry import create_model
from pqd.run.config import RunConfig
from pqd.run.pipeline import run_pipeline
from pqd.train.checkpoint import load_checkpoint


@pytest.mark.slow
def test_two_runs_of_one_command_give_identical_metrics(tmp_path):
    """Two fresh `pqd run` processes, same config and seed, two directories: accuracy, sparsity,
    file sizes and the float-op report agree exactly (latency and wall time are measurements)."""
    cfg = write_config(tmp_path / "c.yaml", tiny(data={"train_subset": 128, "test_subset": 128}))
    procs = [
        subprocess.Popen(
            pqd_cmd("run", str(cfg), "--out", str(tmp_path / name), "--quiet"),
            env=cli_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b")
    ]
    for p in procs:  # concurrently: one thread each
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    for key in ("accuracy", "sparsity", "size_bytes", "quantization", "num_classes", "stages"):
        assert a[key] == b[key], key
    assert a["final_form"] == "int8" and a["size_bytes"]["final"] > 0
    assert (tmp_path / "a" / "teacher.safetensors").read_bytes() == (
        tmp_path / "b" / "teacher.safetensors"
    ).read_bytes()


def test_prune_then_ptq_deploys_the_saved_calibration(tiny_teacher, tmp_path):
    """P -> PTQ used to crash (masks addressed 'conv1', PTQ's eval fusion puts a ConvReLU2d there), and
    finalize evaluated the observer model on the test set before converting it, so the deployed INT8
    model was calibrated on test images too (and differed from what a resumed run converts)."""
    cfg = RunConfig.from_dict(
        tiny(stages="P:1,Q:0", quantize={"mode": "ptq", "calibration_batches": 2}, teacher=tiny_teacher)
    )
    m = run_pipeline(cfg, tmp_path)
    assert m["final_form"] == "int8"
    assert m["sparsity"]["achieved"] == pytest.approx(0.5, abs=0.01) and m["sparsity"]["achieved_int8"] >= 0.49

    tensors, _ = load_checkpoint(tmp_path / "stages" / "2_quantize" / "student.safetensors")
    saved = prepare(create_model("resnet18", num_classes=10, width=0.125), torch.zeros(2, 3, 32, 32), mode="ptq")
    saved.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    expected = convert_student(Student(saved, {k[5:]: v for k, v in tensors.items() if k.startswith("mask.")}, "ptq"))
    deployed = torch.jit.load(str(tmp_path / "model_int8.pt"))
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # model_int8.pt takes raw images; its forward_normalized is the bare INT8 model (normalised input)
        assert torch.equal(deployed.forward_normalized(x), expected(x)), (
            "the deployed INT8 model is not the saved calibrated student"
        )
