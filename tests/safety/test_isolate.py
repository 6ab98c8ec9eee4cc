"""A native crash in one runtime's check becomes an error naming runtime and
model, and the other checks still report."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from pqd.errors import ConfigError, RuntimeCrash, StorageError
from pqd.safety.isolate import isolate_each, run_isolated

HERE = [Path(__file__).parent]
T = "isolate_targets"


def test_returns_json_value_from_another_process():
    out = run_isolated(f"{T}:add", {"a": 2, "b": 3}, timeout=60, extra_path=HERE)
    assert out["sum"] == 5 and out["pid"] != os.getpid()


@pytest.mark.parametrize("func, sig", [("segv", "SIGSEGV"), ("null_deref", "SIGSEGV"), ("abort", "SIGABRT")])
def test_native_crash_becomes_runtime_crash(func, sig):
    with pytest.raises(
        RuntimeCrash, match=rf"runtime openvino / model 'densenet' \({T}:{func}\) crashed with {sig}"
    ) as info:
        run_isolated(f"{T}:{func}", {}, timeout=60, runtime="openvino", model="densenet", extra_path=HERE)
    assert info.value.signal == sig and not info.value.timed_out
    if func == "segv":
        assert "compiling model..." in str(info.value)  # the child's stderr tail is in the message


def test_timeout_kills_child():
    t0 = time.perf_counter()
    with pytest.raises(RuntimeCrash, match=r"did not finish within 1 s") as info:
        run_isolated(f"{T}:sleep", {"seconds": 60}, timeout=1, runtime="ort", extra_path=HERE)
    assert info.value.timed_out and time.perf_counter() - t0 < 20


def test_errors_cross_the_process_boundary():
    with pytest.raises(ConfigError, match="bad option x"):
        run_isolated(f"{T}:config_error", {}, timeout=60, extra_path=HERE)
    with pytest.raises(StorageError, match="disk gone"):  # nearest pqd.errors class of a subclass
        run_isolated(f"{T}:subclass_error", {}, timeout=60, extra_path=HERE)
    with pytest.raises(RuntimeCrash, match="failed: ValueError: shape mismatch"):
        run_isolated(f"{T}:value_error", {}, timeout=60, extra_path=HERE)
    with pytest.raises(RuntimeCrash, match="TypeError: Object of type object is not JSON serializable"):
        run_isolated(f"{T}:not_json", {}, timeout=60, extra_path=HERE)
    with pytest.raises(RuntimeCrash, match="exited with status 3 without a result"):
        run_isolated(f"{T}:hard_exit", {}, timeout=60, extra_path=HERE)
    with pytest.raises(RuntimeCrash, match="ModuleNotFoundError"):
        run_isolated("no_such_module_xyz:f", {}, timeout=60)
    with pytest.raises(ValueError, match="package.module:function"):
        run_isolated("nocolon", {}, timeout=1)
    with pytest.raises(TypeError, match="JSON-serialisable"):
        run_isolated(f"{T}:add", {"a": object()}, timeout=1)


def test_each_runtime_reports_despite_a_crash():
    out = isolate_each(
        {
            "onnxruntime": (f"{T}:add", {"a": 1, "b": 1}),
            "openvino": (f"{T}:segv", {}),
            "torch": (f"{T}:add", {"a": 2, "b": 2}),
        },
        timeout=60,
        model="densenet",
        extra_path=HERE,
    )
    assert out["onnxruntime"]["ok"] and out["onnxruntime"]["value"]["sum"] == 2
    assert out["torch"]["ok"] and out["torch"]["value"]["sum"] == 4
    assert (
        out["openvino"] == {"ok": False, "kind": "crash", "error": out["openvino"]["error"]}
        and "SIGSEGV" in out["openvino"]["error"]
    )


def test_working_folder_is_not_on_the_childs_path(tmp_path, monkeypatch):
    (tmp_path / "isolate_targets.py").write_text("def add(a, b):\n    return 'impostor'\n")
    monkeypatch.chdir(tmp_path)
    out = run_isolated(f"{T}:add", {"a": 1, "b": 1}, timeout=60, extra_path=HERE)
    assert out["sum"] == 2
    with pytest.raises(RuntimeCrash, match="ModuleNotFoundError"):  # not importable without extra_path
        run_isolated(f"{T}:add", {"a": 1, "b": 1}, timeout=60)


def test_a_standard_module_planted_in_the_working_folder_does_not_run(tmp_path, monkeypatch):
    marker = tmp_path / "planted-ran"
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    (hostile / "json.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\nraise SystemExit(9)\n"
    )
    monkeypatch.chdir(hostile)
    assert run_isolated(f"{T}:add", {"a": 1, "b": 2}, timeout=60, extra_path=HERE)["sum"] == 3
    assert not marker.exists()


@pytest.mark.parametrize("version", [(3, 10, 0), (3, 11, 0)])
def test_child_command_keeps_the_working_folder_off_sys_path(tmp_path, monkeypatch, version):
    import subprocess
    import sys

    from pqd.safety.isolate import child_environ, python_command

    with monkeypatch.context() as m:
        m.setattr(sys, "version_info", version)  # the command Python 3.10 (no -P) would get, run by this Python
        cmd = python_command("site")  # `python -m site` prints sys.path
    assert ("-P" in cmd) == (version >= (3, 11))
    out = subprocess.run(
        cmd, check=False, cwd=tmp_path, env=child_environ(), capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    import pqd

    assert f"'{Path(pqd.__file__).resolve().parent.parent}'," in out.stdout  # the listing is there, pqd's folder in it
    assert f"'{tmp_path}'" not in out.stdout and "    ''," not in out.stdout
