"""Untrusted files: nothing a user may download is unpickled. A crafted teacher.weights file is
refused through the CLI without running its payload; a tampered checkpoint in a run directory is
refused (never loaded), and deleting it as the message says recomputes it."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import pytest
import torch
from rbhelpers import read_metrics, tiny, write_config

from pqd.cli import main

SRC = Path(__file__).parents[2] / "src" / "pqd"


class _Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _cli_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("pqd: error: ")]
    return line


@pytest.mark.parametrize("kind", ["raw-pickle.pt", "torch-save.pt", "pickle-named.safetensors", "torch-save.bin"])
def test_malicious_teacher_weights_are_refused_and_never_run(kind, capsys, tmp_path):
    marker = tmp_path / "pwned"
    weights = tmp_path / f"teacher-{kind}"
    payload = {"fc.weight": _Payload(marker)}
    if kind.startswith("raw-pickle") or kind.startswith("pickle-named"):
        weights.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, weights)
    cfg = write_config(tmp_path / "c.yaml", tiny(stages="Q:1", teacher={"epochs": 0, "weights": str(weights)}))
    line = _cli_error(capsys, ["run", str(cfg), "--out", str(tmp_path / "run")])
    assert str(weights) in line
    assert re.search(r"weights_only|not valid safetensors", line), line
    assert not marker.exists(), "the pickle payload ran"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished tiny prune-only run (config file, run dir, its metrics)."""
    tmp = tmp_path_factory.mktemp("untrusted")
    cfg = write_config(tmp / "c.yaml", tiny(stages="P:1", teacher={"epochs": 1}))
    out = tmp / "run"
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 0
    return cfg, out, read_metrics(out)


@pytest.mark.parametrize("target", ["stages/1_prune/student.safetensors", "teacher.safetensors"])
def test_tampered_checkpoint_in_run_dir_is_refused_then_recomputed(target, finished_run, capsys):
    cfg, out, metrics = finished_run
    path = out / target
    original = path.read_bytes()
    data = bytearray(original)
    data[-3] ^= 0x01  # one flipped bit in the tensor payload
    path.write_bytes(bytes(data))
    (out / "metrics.json").unlink()
    try:
        line = _cli_error(capsys, ["run", str(cfg), "--out", str(out), "--quiet"])
        assert str(path) in line and "checksum" in line and "delete it to recompute" in line
        path.unlink()  # what the message says to do
        assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 0
        again = read_metrics(out)
        assert again["accuracy"] == metrics["accuracy"] and again["sparsity"] == metrics["sparsity"]
    finally:
        if not path.exists():
            path.write_bytes(original)


def test_pickle_in_place_of_a_run_checkpoint_is_refused_and_never_run(finished_run, capsys, tmp_path):
    cfg, out, _ = finished_run
    path = out / "stages" / "1_prune" / "student.safetensors"
    original = path.read_bytes()
    marker = tmp_path / "pwned"
    path.write_bytes(pickle.dumps({"model.fc.weight": _Payload(marker)}))
    (out / "metrics.json").unlink(missing_ok=True)
    try:
        line = _cli_error(capsys, ["run", str(cfg), "--out", str(out), "--quiet"])
        assert str(path) in line and "not a readable safetensors file" in line
        assert not marker.exists()
    finally:
        path.write_bytes(original)


def test_no_pickle_based_loading_in_src():
    """Every loader in src is one that cannot run code from the file. (``torch.jit.load`` of a run's
    model_int8.pt is TorchScript, not a pickle; what trusting it means is in docs/TROUBLESHOOTING.md.)"""
    unsafe = []
    for py in SRC.rglob("*.py"):
        for n, line in enumerate(py.read_text().splitlines(), 1):
            code = line.split("#")[0]
            where = f"{py.relative_to(SRC)}:{n}: {line.strip()}"
            if "torch.load(" in code and "weights_only=True" not in code:
                unsafe.append(where)
            if (
                re.search(r"\bpickle\.(load|loads|Unpickler)\b", code)
                and "RestrictedUnpickler" not in code
                and "class " not in code
            ):
                unsafe.append(where)
            if re.search(r"\bnp\.load\(", code) and "allow_pickle=False" not in code:
                unsafe.append(where)
            if re.search(r"\byaml\.(load|unsafe_load|full_load)\(", code):
                unsafe.append(where)
    assert not unsafe, "unsafe deserialization:\n" + "\n".join(unsafe)
