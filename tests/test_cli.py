import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from pqd.cli import main


def test_models_and_config_commands(capsys, tmp_path):
    assert main(["models"]) == 0
    assert "resnet18" in capsys.readouterr().out.split()
    assert main(["config", "--set", "prune.sparsity=0.8"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["prune"]["sparsity"] == 0.8


def test_version_is_defined_once_and_printed(capsys):
    import importlib.metadata

    import pqd

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"pqd {pqd.__version__}"
    assert importlib.metadata.version("pqd") == pqd.__version__


def test_bad_config_is_a_clear_error_not_a_traceback(capsys, tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("prune: {sparsity: 1.5}\n")
    assert main(["run", str(p), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "pqd: error: prune.sparsity" in err and "Traceback" not in err
    assert main(["run", str(p), "--out", str(tmp_path / "r"), "--set", "prune.sparsty=0.5"]) == 2
    assert "Did you mean 'prune.sparsity'" in capsys.readouterr().err


def _pqd(*args):
    return [sys.executable, "-m", "pqd.cli", *args]


@pytest.mark.slow
def test_kill_mid_stage_then_resume(tiny_config, tiny_teacher, tmp_path):
    """SIGKILL `pqd run` once a stage has checkpointed an epoch; the same command resumes."""
    cfg = tiny_config | {"stages": "P:1,Q:2,D:1", "teacher": tiny_teacher}
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen(
        _pqd("run", str(cfg_path), "--out", str(out)), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    target = out / "stages" / "2_quantize" / "epoch.safetensors"
    deadline = time.time() + 240
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert target.exists(), "the run never reached the quantize stage"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    teacher_mtime = (out / "teacher.safetensors").stat().st_mtime_ns
    prune_mtime = (out / "stages" / "1_prune" / "student.safetensors").stat().st_mtime_ns
    assert not (out / "metrics.json").exists()

    r = subprocess.run(
        _pqd("run", str(cfg_path), "--out", str(out)), env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming after stage 1 (prune)" in r.stderr
    assert "quantize: resumed from" in r.stderr
    assert "teacher epoch" not in r.stderr and "prune epoch" not in r.stderr, "finished work was recomputed"
    assert (out / "teacher.safetensors").stat().st_mtime_ns == teacher_mtime
    assert (out / "stages" / "1_prune" / "student.safetensors").stat().st_mtime_ns == prune_mtime
    # that the resumed run ends exactly where an uninterrupted one does, tensor for tensor, is
    # tests/robustness/test_interrupt.py's (kill points in every phase)
    assert json.loads((out / "metrics.json").read_text())["final_form"] == "int8"


@pytest.mark.slow
def test_demo_meets_its_promises(tmp_path, capsys):
    """The README's demo: sparsity on target, accuracy kept, INT8 agreeing with fake-quant."""
    assert main(["demo", "--out", str(tmp_path / "demo"), "--set", "measure.runs=50"]) == 0
    assert "top-1 accuracy" in capsys.readouterr().out
    m = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert m["stages"] == "P:4,Q:4,D:4" and m["final_form"] == "int8"
    assert abs(m["sparsity"]["achieved"] - m["sparsity"]["target"]) <= 0.01
    assert m["sparsity"]["achieved_int8"] >= m["sparsity"]["target"] - 0.01, "pruned zeros must survive conversion"
    assert m["accuracy"]["final_top1"] >= m["accuracy"]["teacher_top1"] - 0.02
    assert m["accuracy"]["int8_vs_fake_quant_agreement"] >= 0.99
    assert m["size_bytes"]["final"] < m["size_bytes"]["teacher_fp32"]


@pytest.mark.slow
def test_pqd_run_under_torchrun_two_gloo_processes(tiny_config, tiny_teacher, tmp_path):
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_config | {"stages": "P:1,Q:1,D:1", "teacher": tiny_teacher}))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "pqd.cli",
        "run",
        str(cfg_path),
        "--out",
        str(tmp_path / "run"),
        "--quiet",
    ]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["final_form"] == "int8" and m["accuracy"]["final_top1"] > 0.5
    assert r.stdout.count("top-1 accuracy") == 1, "only rank 0 reports"


def test_run_summary_names_the_latency_sides_and_the_test_set():
    from pqd.cli import format_table

    ci = lambda t: {
        "top1": t,
        "ci_low": t - 0.02,
        "ci_high": t + 0.02,
        "n": 10000,
        "method": "wilson",
        "confidence": 0.95,
    }  # noqa: E731
    lat = [
        {"model": m, "batch": 1, "median_ms": ms, "p90_ms": ms, "threads": 2}
        for m, ms in (("teacher_fp32", 4.0), ("final_int8", 1.0))
    ]
    m = {
        "schema": 3,
        "model": "resnet18",
        "dataset": "cifar10",
        "stages": "P:1,Q:2,D:2",
        "final_form": "int8",
        "accuracy": {
            "teacher_top1": 0.6,
            "final_top1": 0.62,
            "teacher_top1_ci": ci(0.6),
            "final_top1_ci": ci(0.62),
            "test_n": 10000,
            "test_full_split": True,
        },
        "size_bytes": {"teacher_fp32": 4_000_000, "final": 1_000_000, "final_file": "model_int8.pt"},
        "latency": lat,
    }
    out = format_table(m)
    assert "62.00% [60.0, 64.0]" in out and "full test split (n=10000)" in out
    assert "4.00x (PyTorch eager FP32 vs TorchScript INT8)" in out and "pqd bench" in out
    assert "x faster" not in out
    assert "own threading environment" not in out  # the controlled worker environment (or not recorded): nothing to say
    inherited = m | {
        "schema": 4,
        "latency_env": {
            "inherited": True,
            "harness": "worker processes",
            "variables": {"OMP_NUM_THREADS": None, "OMP_WAIT_POLICY": "PASSIVE"},
        },
    }
    assert (
        "(latency timed in this shell's own threading environment, not the controlled one: OMP_WAIT_POLICY=PASSIVE)"
        in format_table(inherited)
    )


@pytest.mark.parametrize(
    "argv", [["run", "c.yaml", "--out", "r dir"], ["sweep", "s.yaml", "--out", "sw"], ["export", "r"]]
)
def test_ctrl_c_prints_one_resume_line_and_exits_130(argv, monkeypatch, capsys):
    import pqd.cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(pqd.cli, "_main", interrupted)
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        f"pqd: interrupted; finished steps are kept. Resume with: pqd {' '.join(argv)}".replace("r dir", "'r dir'")
    ]


@pytest.mark.slow
def test_sigint_during_pqd_run_is_one_line_exit_130(tiny_config, tmp_path):
    """A real Ctrl-C (SIGINT to the process group) while the teacher trains."""
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_config | {"teacher": {"epochs": 50, "lr": 0.05}}))
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen(
        _pqd("run", str(cfg_path), "--out", str(out)),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        # a shell without job control starts background jobs with SIGINT ignored, and children inherit that:
        # give the run the default disposition a terminal's Ctrl-C meets, however this test was started
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    target = out / "teacher.epoch.safetensors"
    deadline = time.time() + 240
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert target.exists(), "the teacher never finished an epoch"
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert (
        err.strip().splitlines()[-1]
        == f"pqd: interrupted; finished steps are kept. Resume with: pqd run {cfg_path} --out {out}"
    )


def test_size_change_says_larger_when_the_file_grew():
    from pqd.cli import size_change

    assert size_change(10_000, 16_000) == "1.6x larger"
    assert size_change(16_000, 4_000) == "4.0x smaller"
    assert size_change(5, 5) == "the same size"


def test_warning_lines_carry_a_level_marker_and_information_lines_none():
    import logging

    from pqd.cli import LevelMarkFormatter

    f = LevelMarkFormatter("%(levelmark)s%(name)s: %(message)s")
    make = lambda level: logging.LogRecord("pqd", level, __file__, 1, "msg", None, None)  # noqa: E731
    assert f.format(make(logging.INFO)) == "pqd: msg"
    assert f.format(make(logging.WARNING)) == "WARNING pqd: msg"
    assert f.format(make(logging.ERROR)) == "ERROR pqd: msg"


def test_a_module_path_without_factory_is_told_the_module_factory_form(capsys, tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: {name: mypkg.nets}\n")
    assert main(["run", str(p), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "give its factory too: 'mypkg.nets:factory'" in err and "'resnet18'" in err


def test_run_summary_says_when_latency_fell_back_to_this_process_and_lists_warnings():
    from pqd.cli import format_table

    def metrics(harness: str) -> dict:
        lat = [
            {"model": m, "batch": 1, "median_ms": ms, "p90_ms": ms, "threads": 2, "harness": harness}
            for m, ms in (("teacher_fp32", 4.0), ("final_int8", 1.0))
        ]
        return {
            "schema": 3,
            "model": "resnet18",
            "dataset": "cifar10",
            "stages": "Q:1",
            "final_form": "int8",
            "accuracy": {"teacher_top1": 0.6, "final_top1": 0.62},
            "warnings": ["structured: budget missed"],
            "size_bytes": {"teacher_fp32": 4_000_000, "final": 1_000_000, "final_file": "model_int8.pt"},
            "latency": lat,
        }

    fell_back = format_table(metrics("in-process"))
    assert "own worker process" not in fell_back and "in this process" in fell_back
    assert "own worker process" in format_table(metrics("worker processes"))
    assert "WARNING: structured: budget missed" in fell_back
