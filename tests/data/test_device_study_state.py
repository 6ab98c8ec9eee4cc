"""tools/gpu/gpu_study_state.py: what one GPU-study chunk hands to the next (no training here)."""

from __future__ import annotations

import importlib.util
import io
import json
import random
import tarfile
from pathlib import Path

import pytest

pytest.importorskip("zstandard")
WEIGHTS = random.Random(0).randbytes(5000)  # incompressible
BENCH = Path(__file__).parents[2] / "tools" / "gpu" / "gpu_study_state.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_study_state", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def _tree(root: Path, *, teacher_done: bool) -> None:
    s = "study/"
    files = {
        s + "teacher.safetensors": b"source" * 1000,
        s + "sweep/sweep.yaml": b"name: x",
        s + "sweep/results.sqlite": b"db",
        s + "sweep/runs/teacher-abc/config.yaml": b"c",
        s + "sweep/runs/teacher-abc/teacher.safetensors": WEIGHTS,
        s + "sweep/runs/PQD/metrics.json": json.dumps({"final": 0.9}).encode(),
        s + "sweep/runs/PQD/config.yaml": b"c",
        s + "sweep/runs/PQD/model_int8.pt": b"big",
        s + "sweep/runs/PQD/model_int8.pqdz": b"small",
        s + "sweep/runs/PQD/teacher.safetensors": b"copy",
        s + "sweep/runs/PQD/stages/1_prune/student.safetensors": b"student",
        s + "sweep/runs/QPD/config.yaml": b"c",  # unfinished
        s + "sweep/runs/QPD/stages/1_quantize/epoch.safetensors": b"ckpt",
    }
    if teacher_done:
        files[s + "sweep/runs/teacher-abc/metrics.json"] = json.dumps({"final": 0.95}).encode()
    _write(root, files)


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_pack_keeps_finished_runs_small_files_and_the_teacher_then_unpacks(tmp_path):
    st = _load()
    _tree(tmp_path / "a", teacher_done=True)
    parts = st.pack(tmp_path / "a", "study", tmp_path / "out", part_mb=0.0005)  # ~524-byte parts: several
    assert len(parts) > 1 and all(p.stat().st_size <= 525 for p in parts)
    results = json.loads((tmp_path / "out" / "study-results.json").read_text())
    assert results == {"teacher-abc": {"final": 0.95}, "PQD": {"final": 0.9}}
    assert st.unpack(tmp_path / "b", "study", tmp_path / "out")
    got = _files(tmp_path / "b")
    assert got == {
        "study/sweep/sweep.yaml",
        "study/sweep/results.sqlite",
        "study/sweep/runs/teacher-abc/config.yaml",
        "study/sweep/runs/teacher-abc/metrics.json",
        "study/sweep/runs/teacher-abc/teacher.safetensors",
        "study/sweep/runs/PQD/metrics.json",
        "study/sweep/runs/PQD/config.yaml",
        "study/sweep/runs/PQD/model_int8.pqdz",
    }
    assert (tmp_path / "b/study/sweep/runs/teacher-abc/teacher.safetensors").read_bytes() == WEIGHTS


def test_source_teacher_travels_until_the_teacher_run_finished(tmp_path):
    st = _load()
    _tree(tmp_path / "a", teacher_done=False)
    st.pack(tmp_path / "a", "study", tmp_path / "out", part_mb=15)
    st.unpack(tmp_path / "b", "study", tmp_path / "out")
    got = _files(tmp_path / "b")
    assert "study/teacher.safetensors" in got and not any("teacher-abc" in f for f in got)


def test_unpack_without_state_and_refuses_escaping_members(tmp_path):
    import zstandard

    st = _load()
    assert st.unpack(tmp_path / "root", "study", tmp_path / "nothing") is False
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("study/../../evil.txt")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "study.tar.zst.00").write_bytes(zstandard.ZstdCompressor().compress(buf.getvalue()))
    with pytest.raises(SystemExit, match="refusing"):
        st.unpack(tmp_path / "root", "study", tmp_path / "parts")
    assert not (tmp_path / "evil.txt").exists()
