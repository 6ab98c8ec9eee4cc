"""``pqd tune`` end to end on digits with the shared tiny teacher: killed mid-rung and resumed, it ends
with an exported winner that ``pqd predict`` runs and a report; a tolerance nothing meets still hands
over a model and says so."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pqd.commands.predict import predict_files
from pqd.commands.tune import runner, split_tune_dict, tune

pytest.importorskip("onnxruntime")


def tune_dict(base: dict, teacher: dict, **tune_kw) -> dict:
    cfg = base
    cfg.pop("stages")
    cfg.pop("prune")
    cfg["teacher"] = teacher
    cfg["structured"] = {"samples": 3, "runs": 10, "max_iters": 2}
    cfg["tune"] = {
        "runtime": "onnxruntime",
        "threads": 1,
        "runs": 10,
        "max_drop": 100.0,
        "epochs": 3,
        "candidate_epochs": 1,
        "fallback_layers": 1,
        "fractions": [0.7],
        "max_structured": 1,
    } | tune_kw
    return cfg


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists():
            return
        if proc.poll() is not None:
            raise AssertionError(f"pqd tune ended (rc {proc.returncode}) before {path} appeared")
        time.sleep(0.2)
    raise AssertionError(f"{path} did not appear within {timeout} s")


@pytest.mark.slow
def test_tune_killed_mid_rung_resumes_and_hands_over_a_winner(tmp_path, tiny_config, tiny_teacher):
    cfg_path, out = tmp_path / "tune.yaml", tmp_path / "tune"
    cfg_path.write_text(yaml.safe_dump(tune_dict(tiny_config, tiny_teacher)))
    cmd = [sys.executable, "-m", "pqd.cli", "tune", str(cfg_path), "--out", str(out), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:  # the structured candidate has started training: kill it there
        _wait_for(out / "runs" / "s0.7" / "stages", proc, timeout=900)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    ptq_metrics = out / "runs" / "ptq" / "metrics.json"
    assert ptq_metrics.is_file()
    stamp = ptq_metrics.stat().st_mtime_ns
    state = json.loads((out / "tune.json").read_text())
    assert [c["candidate"]["name"] for c in state["candidates"]] == ["ptq"]
    assert "choice" not in state

    config, tune_config = split_tune_dict(yaml.safe_load(cfg_path.read_text()))
    record = tune(config, out, tune_config=tune_config)

    assert ptq_metrics.stat().st_mtime_ns == stamp  # the finished candidate was not redone
    names = [c["candidate"]["name"] for c in record["candidates"]]
    assert names == ["ptq", "s0.7"]  # PTQ passed (max_drop 100): no fallback, no QAT
    assert record["choice"]["met"] and record["choice"]["winner"] in [*names, "dense_fp32"]
    for c in record["candidates"]:
        ev = c["eval"]
        assert ev["val"]["n"] == record["dense"]["val"]["n"]  # paired on the same validation images
        assert c["latency"]["median_ms"] > 0 and c["latency"]["x_vs_dense_fp32"] > 0
        assert c["verdict"]
    # the dense FP32 model every candidate is judged against is the PTQ run's teacher, exported there only
    assert (out / "runs" / "ptq" / "teacher_fp32.onnx").is_file()
    assert not (out / "runs" / "s0.7" / "teacher_fp32.onnx").exists()
    timed = {r["model"] for r in record["latency"]["records"]}
    assert timed == {"dense_fp32", "ptq", "s0.7"}  # one interleaved run, dense FP32 first
    assert record["latency"]["records"][0]["model"] == "dense_fp32"

    winner = out / "winner"
    if record["choice"]["winner"] == "dense_fp32":  # a model this small may run faster in FP32 than in INT8
        assert (winner / "model_fp32.onnx").is_file()
    else:
        assert (winner / "model_int8.pt").is_file() and (winner / "model_int8.onnx").is_file()
    img = tmp_path / "digit.png"
    Image.fromarray((np.random.default_rng(0).random((20, 24, 3)) * 255).astype(np.uint8)).save(img)
    preds = predict_files(winner, [img])
    assert len(preds) == 1 and preds[0]["class"] in [str(i) for i in range(10)]

    again = tune(config, out, tune_config=tune_config)  # a finished ladder resumes into a fresh timing and report
    assert [c["candidate"]["name"] for c in again["candidates"]] == names
    assert again["choice"]["winner"] in [*names, "dense_fp32"] and again["dense"] == record["dense"] | {
        k: again["dense"][k] for k in ("latency", "size_mb", "verdict")
    }

    md = (out / "report.md").read_text()
    for name in names:
        assert f"| {name} |" in md
    assert "Why the ladder stopped" in md and (out / "report.html").is_file()


@pytest.mark.slow
def test_a_budget_nothing_meets_still_hands_over_a_model_and_says_so(tmp_path, tiny_config, tiny_teacher, monkeypatch):
    monkeypatch.setattr(runner, "passes", lambda *a, **k: False)  # every INT8 candidate outside the tolerance
    config, tune_config = split_tune_dict(
        tune_dict(tiny_config, tiny_teacher, epochs=0, max_drop=0.0, latency_budget_ms=1e-4)
    )
    record = tune(config, tmp_path / "tune", tune_config=tune_config)
    names = [c["candidate"]["name"] for c in record["candidates"]]
    assert names == ["ptq", "ptq_fp32x1"]  # QAT does not fit a zero training budget
    assert any("training budget" in n for n in record["notes"])
    choice = record["choice"]
    # only the dense FP32 model is within the tolerance, and it misses the latency budget: handed over, not met
    assert not choice["met"] and choice["winner"] == "dense_fp32"
    assert "meets the budget" in choice["message"]
    assert record["dense"]["verdict"].startswith("kept")
    assert all(c["verdict"].startswith("rejected") for c in record["candidates"])
    winner = tmp_path / "tune" / "winner"
    img = tmp_path / "digit.png"
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(img)
    assert len(predict_files(winner, [img])) == 1
    assert "Not met" in (tmp_path / "tune" / "report.md").read_text()
