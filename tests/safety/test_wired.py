"""The safety checks end to end, through the CLI, each with a tiny digits config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

SRC = str(Path(__file__).resolve().parents[2] / "src")

TINY = {
    "seed": 0,
    "stages": "P:1,D:1",
    "model": {"name": "resnet18", "width": 0.125},
    "data": {"dataset": "digits", "train_subset": 300, "test_subset": 100},
    "train": {"batch_size": 32, "progress": False, "threads": 1},
    "teacher": {"epochs": 1, "lr": 0.05},
    "measure": {"threads": 1, "warmup": 1, "runs": 3, "batch_sizes": [1], "large_batch_runs": 1},
}


def pqd(
    *args: str, cwd: Path | None = None, umask: int | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    pre = (lambda: os.umask(umask)) if umask is not None else None
    return subprocess.run(
        [sys.executable, "-m", "pqd.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=pre,
    )


@pytest.fixture()
def tiny(tmp_path: Path) -> Path:
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(TINY))
    return p


def test_run_never_overwrites_users_config(tiny: Path, tmp_path: Path):
    p = tmp_path / "p"
    p.mkdir()
    (p / "config.yaml").write_text("db: {password: x}\n")
    r = pqd("run", str(tiny), "--out", str(p), "--set", "train.batch_size=100000")
    assert r.returncode == 2 and ("pqd did not write" in r.stderr or "no .pqd-run marker" in r.stderr), r.stderr
    assert (p / "config.yaml").read_text() == "db: {password: x}\n"
    assert sorted(x.name for x in p.iterdir()) == ["config.yaml"]  # no env.json, no log.txt


def test_run_never_replaces_users_own_pqd_config(tiny: Path, tmp_path: Path):
    p = tmp_path / "mine"
    p.mkdir()
    text = "# hand-written\n" + yaml.safe_dump({**TINY, "teacher": {**TINY.get("teacher", {}), "epochs": 7}})
    (p / "config.yaml").write_text(text)
    r = pqd("run", str(tiny), "--out", str(p))
    assert r.returncode == 2 and "no .pqd-run marker" in r.stderr, r.stderr
    assert (p / "config.yaml").read_text() == text
    assert sorted(x.name for x in p.iterdir()) == ["config.yaml"]


def test_sweep_never_rewrites_users_sweep_file(tiny: Path, tmp_path: Path):
    text = "# my sweep\nbase: tiny.yaml\nvariants:\n  pqd: {stages: 'P:1'}\n"
    (tmp_path / "sweep.yaml").write_text(text)
    r = pqd("sweep", "sweep.yaml", "--out", ".", "--set", "prune.sparsity=0.6", cwd=tmp_path)
    assert r.returncode == 2 and "pqd did not write" in r.stderr, r.stderr
    assert (tmp_path / "sweep.yaml").read_text() == text


def test_second_process_refused_while_a_run_holds_the_folder(tiny: Path, tmp_path: Path):
    run = tmp_path / "r"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import sys, time; sys.path.insert(0, {SRC!r})
        from pqd.safety.fsguard import DirLock, check_writable_run_dir
        check_writable_run_dir({str(run)!r}, expected_files=[])
        with DirLock({str(run)!r}):
            print("locked", flush=True); time.sleep(120)
        """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = pqd("run", str(tiny), "--out", str(run), "--set", "prune.sparsity=0.8")
        assert r.returncode == 2 and f"is in use by pid {holder.pid}" in r.stderr, r.stderr
    finally:
        holder.kill()
        holder.wait()


def test_divergence_stops_the_run(tiny: Path, tmp_path: Path):
    r = pqd("run", str(tiny), "--out", str(tmp_path / "r"), "--set", "teacher.lr=1000000")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "teacher: training diverged" in r.stderr and "teacher.lr" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "r" / "metrics.json").exists()


def test_yaml_bombs_refused_fast(tiny: Path, tmp_path: Path):
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    t0 = time.perf_counter()
    r = pqd("run", str(bomb), "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "YAML bomb" in r.stderr, r.stderr
    (tmp_path / "s.yaml").write_text("base: bomb.yaml\nvariants: {a: {}}\n")
    r = pqd("sweep", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "sw"))
    assert r.returncode == 2 and "YAML bomb" in r.stderr, r.stderr
    (tmp_path / "deep.yaml").write_text("[" * 5000 + "]" * 5000)
    r = pqd("run", str(tmp_path / "deep.yaml"), "--out", str(tmp_path / "y"))
    assert r.returncode == 2 and "nested deeper than" in r.stderr and "RecursionError" not in r.stderr, r.stderr
    (tmp_path / "g.yaml").write_text(
        yaml.safe_dump(
            {
                "base": TINY,
                "grid": {"seed": list(range(10**4))},
                "variants": {"a": {"grid": {"prune.sparsity": [0.1] * 10**4}}},
            }
        )
    )
    r = pqd("sweep", str(tmp_path / "g.yaml"), "--out", str(tmp_path / "gs"), "--dry-run")
    assert r.returncode == 2 and "100,000,000 runs" in r.stderr and "MemoryError" not in r.stderr, r.stderr
    assert time.perf_counter() - t0 < 60


def test_set_float_without_dot(tiny: Path):
    r = pqd("config", str(tiny), "--set", "prune.lr=1e-3")
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load(r.stdout)["prune"]["lr"] == 0.001


def test_load_run_imports_no_code(downloaded_run):
    from pqd.errors import UntrustedCodeError
    from pqd.run.loader import load_int8_module as load_run

    run, canary = downloaded_run
    with pytest.raises(UntrustedCodeError, match="allow_code=True"):
        load_run(run)
    assert not canary.exists()


@pytest.mark.slow
def test_outputs_follow_umask_and_predict_runs_the_deployable(tiny: Path, tmp_path: Path):
    from PIL import Image

    run = tmp_path / "r"
    r = pqd("run", str(tiny), "--out", str(run), "--set", "stages=P:1,Q:1", umask=0o022, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("config.yaml", "env.json", "metrics.json", "model_int8.pt", "teacher.safetensors"):
        assert (run / name).stat().st_mode & 0o777 == 0o644, name
    from pqd.config import DataConfig
    from pqd.data import load_data

    data = load_data(DataConfig(dataset="digits", train_subset=300, test_subset=100))
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(20):
        Image.fromarray(data.test.x[i].permute(1, 2, 0).numpy()).save(imgs / f"{i:02d}_{int(data.test.y[i])}.png")
    r = pqd("predict", str(run), str(imgs), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    # raw PNGs through `pqd predict` give exactly the deployed model's answers on pqd's own
    # normalised test tensors (not the bare file fed [0,1] images, which scores near chance)
    import torch

    from pqd.data import batches

    deployed = torch.jit.load(str(run / "model_int8.pt"))
    x, _ = next(iter(batches(data.test.subset(torch.arange(20)), batch_size=20, mean=data.mean, std=data.std)))
    with torch.no_grad():
        want = deployed.forward_normalized(x).argmax(1).tolist()
    assert [o["class"] for o in sorted(out, key=lambda o: o["image"])] == [str(w) for w in want]


def test_every_yaml_read_goes_through_safeyaml():
    """One unbounded yaml.safe_load left anywhere (a sweep's base, a saved config.yaml)
    is enough for a YAML bomb."""
    import re

    root = Path(SRC) / "pqd"
    offenders = [
        f"{p.relative_to(root)}:{i}"
        for p in root.rglob("*.py")
        if p.name != "safeyaml.py"
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if re.search(r"yaml\.(safe_load|load|full_load|unsafe_load)\(", line)
    ]
    assert offenders == [], offenders
