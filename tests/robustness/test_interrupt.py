"""Interruption: SIGKILL at seeded random points in every phase (teacher, each stage, finalize),
including in the middle of checkpoint writes; re-running the same command finishes with exactly
the metrics of an uninterrupted run, and nothing half-written is ever loaded.

The kill points come from the event list of an uninterrupted run (``killpoint.py`` numbers every
phase entry, optimizer step and file-write step). By default 3 of them run (mid-epoch after
an epoch checkpoint, mid-write, right after an output file lands); ``PQD_KILL_POINTS=all`` adds one
point in every phase and one right before a rename; ``PQD_KILL_SEED`` picks others (failures print
the event).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch
import yaml
from rbhelpers import HERE, cli_env, read_metrics, run_cli, tiny, write_config

from pqd.train.checkpoint import load_checkpoint

SEED = int(os.environ.get("PQD_KILL_SEED", "0"))
WANT = os.environ.get("PQD_KILL_POINTS", "3")
PHASES = ("setup", "teacher", "prune", "quantize", "distill", "finalize")
MAX_POINTS = len(PHASES) + 4 if WANT == "all" else int(WANT)


def _killpoint(events_log, kill_at: int, cfg, out) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        str(HERE / "killpoint.py"),
        str(events_log),
        str(kill_at),
        "--",
        "run",
        str(cfg),
        "--out",
        str(out),
        "--quiet",
    ]
    return subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """An uninterrupted run of the config every kill test uses, with its numbered events."""
    tmp = tmp_path_factory.mktemp("kill-reference")
    cfg = write_config(tmp / "c.yaml", tiny(stages="P:2,Q:2,D:2", data={"train_subset": 128, "test_subset": 128}))
    r = _killpoint(tmp / "events.jsonl", -1, cfg, tmp / "run")
    assert r.returncode == 0, r.stderr[-3000:]
    events = [json.loads(line) for line in (tmp / "events.jsonl").read_text().splitlines()]
    return cfg, read_metrics(tmp / "run"), events, tmp / "run"


@pytest.fixture(scope="session")
def kill_points(reference):
    """Seeded picks from the reference run's events: [0] an optimizer step after a phase's first epoch
    checkpoint (the re-run resumes mid-phase from it), [1] the middle of a checkpoint write during
    training, [2] just after a phase's output file is renamed into place (before its epoch file is
    deleted); with PQD_KILL_POINTS=all also one event of every phase and one right before a rename."""
    events = reference[2]
    rng = random.Random(SEED)
    by_phase = {p: [e for e in events if e["phase"] == p] for p in PHASES}
    assert all(by_phase.values()), f"a phase has no events: {[p for p, v in by_phase.items() if not v]}"
    training = ("teacher", "prune", "quantize", "distill")
    resumable = [
        e
        for e in events
        if e["kind"] == "step"
        and any(
            x["phase"] == e["phase"]
            and x["kind"] == "after-rename"
            and x["detail"].endswith("epoch.safetensors")
            and x["i"] < e["i"]
            for x in events
        )
    ]
    first = [
        rng.choice(resumable),
        rng.choice([e for e in events if e["kind"] == "write-half" and e["phase"] in training]),
        rng.choice(
            [
                e
                for e in events
                if e["kind"] == "after-rename" and e["detail"].endswith(("student.safetensors", "teacher.safetensors"))
            ]
        ),
    ]
    rest = [rng.choice(by_phase[p]) for p in PHASES] + [rng.choice([e for e in events if e["kind"] == "before-rename"])]
    rest = [e for e in rest if e not in first]
    if WANT != "all":
        rest = rng.sample(rest, max(0, min(len(rest), MAX_POINTS - len(first))))
    return (first + rest)[:MAX_POINTS]


def _nothing_half_written(out) -> None:
    """Every file under its real name is complete: checkpoints verify, YAML/JSON parse, TorchScript loads."""
    for f in out.rglob("*.safetensors"):
        load_checkpoint(f)  # raises CheckpointError on a truncated or corrupt file
    for f in out.rglob("*.json"):
        json.loads(f.read_text())
    if (out / "config.yaml").exists():
        assert isinstance(yaml.safe_load((out / "config.yaml").read_text()), dict)
    if (out / "model_int8.pt").exists():
        torch.jit.load(str(out / "model_int8.pt"))


@pytest.mark.slow
@pytest.mark.parametrize("n", range(MAX_POINTS), ids=lambda n: f"point{n}")
def test_sigkill_then_same_command_ends_like_an_uninterrupted_run(n, reference, kill_points, tmp_path):
    cfg, clean, _, clean_dir = reference
    if n >= len(kill_points):
        pytest.skip("fewer distinct kill points than asked for")
    point = kill_points[n]
    where = f"kill at {point} (PQD_KILL_SEED={SEED})"
    out = tmp_path / "run"
    killed = _killpoint(tmp_path / "events.jsonl", point["i"], cfg, out)
    assert killed.returncode == -9, f"not killed: {where}\n{killed.stderr[-2000:]}"
    last = json.loads((tmp_path / "events.jsonl").read_text().splitlines()[-1])
    assert last == point, f"the run's events diverged from the reference run's: {last} != {point}"
    _nothing_half_written(out)
    finished = [p.parent.name.split("_", 1)[1] for p in out.glob("stages/*/student.safetensors")]
    pending = [f for f in out.glob("stages/*/epoch.safetensors") if not (f.parent / "student.safetensors").exists()]
    if (out / "teacher.safetensors").exists():
        finished.append("teacher")
    elif (out / "teacher.epoch.safetensors").exists():
        pending.append(out / "teacher.epoch.safetensors")

    resumed = run_cli("run", str(cfg), "--out", str(out))
    assert resumed.returncode == 0, f"resume failed after a {where}:\n{resumed.stderr[-3000:]}"
    for phase in finished:
        assert f"{phase} epoch" not in resumed.stderr, f"{phase} was finished before the {where} but trained again"
    for f in pending:
        assert f"resumed from {f}" in resumed.stderr, f"{f} was left by the {where} but not resumed from"
    m = read_metrics(out)
    assert m["accuracy"] == clean["accuracy"], f"{where} changed the accuracy"
    assert m["sparsity"] == clean["sparsity"], f"{where} changed the sparsity"
    assert m["size_bytes"]["teacher_fp32"] == clean["size_bytes"]["teacher_fp32"]
    # stronger than equal metrics: every saved tensor is bit-identical to the uninterrupted run's
    for f in [
        "teacher.safetensors",
        *(str(p.relative_to(clean_dir)) for p in clean_dir.glob("stages/*/student.safetensors")),
    ]:
        want, got = load_checkpoint(clean_dir / f)[0], load_checkpoint(out / f)[0]
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), (
            f"{f} differs after a {where}"
        )
    _nothing_half_written(out)
