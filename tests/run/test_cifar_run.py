"""`pqd run` on the real CIFAR-10 JPEG copy (skips unless PQD_DATA_DIR points at it)."""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_pqd_run_resnet18_on_cifar10(shared_data_dir, tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "pqd.cli",
        "run",
        "configs/resnet18_cifar10_cpu.yaml",
        "--out",
        str(out),
        "--set",
        f"data.root={shared_data_dir / 'cifar10-jpeg.tar.gz'}",
        "--set",
        "data.train_subset=2500",
        "--set",
        "data.test_subset=1000",
        "--set",
        "teacher.epochs=3",
        "--set",
        "stages=P:1,Q:1,D:1",
        "--set",
        "measure.runs=50",
        "--set",
        "measure.batch_sizes=[1]",
    ]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    r = subprocess.run(
        cmd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    for f in (
        "config.yaml",
        "env.json",
        "teacher.safetensors",
        "model_int8.pt",
        "metrics.json",
        "stages/3_distill/student.safetensors",
    ):
        assert (out / f).is_file(), f
    m = json.loads((out / "metrics.json").read_text())
    assert m["dataset"] == "cifar10" and m["num_classes"] == 10
    assert m["accuracy"]["final_top1"] > 0.25, "clearly above chance (0.10)"
    assert m["sparsity"]["achieved"] == pytest.approx(0.7, abs=0.01)
    assert "top-1 accuracy" in r.stdout
