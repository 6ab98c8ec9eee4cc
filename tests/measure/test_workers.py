"""Benchmark workers: a variant in its own process, timed on command; lean for ONNX runtimes."""

import os

import pytest
import torch
from torch import nn

from pqd.measure.latency import Blocks, interleave
from pqd.measure.workers import WorkerError, start_workers, thread_variables

BASE = {"input_shape": [3, 4, 4], "batch_sizes": [1, 2], "seed": 0, "threads": 1}


@pytest.fixture
def scripted(tmp_path):
    m = torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 5)).eval())
    path = tmp_path / "m.pt"
    torch.jit.save(m, str(path))
    return path


@pytest.fixture
def tiny_onnx(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["logits"])],
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3, 4, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    path = tmp_path / "relu.onnx"
    onnx.save(model, str(path))
    return path


def test_worker_times_blocks_and_reports_memory(scripted):
    with start_workers({"ts": BASE | {"kind": "torchscript", "path": str(scripted)}}) as ws:
        w = ws["ts"]
        assert w.info["ready"] and w.info["imports_torch"] is True
        assert w.info["settings"]["threads"] == 1 and w.info["settings"]["runtime"] == "pytorch"
        w.warmup(2, 3)
        times, settle = w.block(2, settle_ms=5, timed=7)
        assert len(times) == 7 and all(t > 0 for t in times) and settle >= 1
        m = w.rss()
        assert m["peak_rss_mb"] >= m["rss_mb"] > 0
        proc = w.proc
    assert proc.poll() is not None, "the worker is stopped on leaving the context"


def test_onnxruntime_worker_never_imports_torch(tiny_onnx):
    with start_workers({"ort": BASE | {"kind": "onnxruntime", "path": str(tiny_onnx)}}) as ws:
        info = ws["ort"].info
        assert info["imports_torch"] is False
        assert info["settings"]["runtime"] == "onnxruntime" and info["settings"]["intra_op_num_threads"] == 1
        times, _ = ws["ort"].block(1, settle_ms=0, timed=3)
        assert len(times) == 3


def test_workers_interleave_with_in_process_timers(scripted):
    from pqd.measure.latency import InProcess

    local = InProcess(lambda x: x.sum(), {1: torch.zeros(1, 3, 4, 4)})
    with start_workers({"ts": BASE | {"kind": "torchscript", "path": str(scripted)}}) as ws:
        recs = interleave(
            {"local": local, "ts": ws["ts"]},
            batch_sizes=(1,),
            threads=1,
            warmup=1,
            runs=6,
            blocks=Blocks(timed=4, settle_ms=0),
        )
    assert [(r["model"], r["runs"], r["blocks"]["rounds"]) for r in recs] == [("local", 6, 2), ("ts", 6, 2)]


def test_a_worker_that_cannot_load_names_the_variant_and_the_cause(tmp_path):
    with (
        pytest.raises(WorkerError, match=r"'broken'.*(No such file|not exist|open file)"),
        start_workers({"broken": BASE | {"kind": "torchscript", "path": str(tmp_path / "missing.pt")}}),
    ):
        pass
    with (
        pytest.raises(WorkerError, match="unknown worker kind 'tensorrt'"),
        start_workers({"bad": BASE | {"kind": "tensorrt"}}),
    ):
        pass


@pytest.fixture
def segv_python(tmp_path, monkeypatch):
    """Workers start through a stand-in interpreter that dies by SIGSEGV unless the spec asks for a
    dynamic batch (as OpenVINO 2026.4 does compiling some INT8 models at a static batch)."""
    import sys

    script = tmp_path / "python-standin"
    script.write_text(
        f'#!/bin/sh\ncase "$*" in *\'"dynamic_batch": true\'*) exec {sys.executable} "$@";; esac\nkill -SEGV $$\n'
    )
    script.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(script))


def test_a_native_crash_names_the_runtime_the_signal_and_what_to_do(tiny_onnx, segv_python):
    with (
        pytest.raises(WorkerError) as err,
        start_workers({"s0": BASE | {"kind": "onnxruntime", "path": str(tiny_onnx)}}),
    ):
        pass
    msg = str(err.value)
    assert (
        "'s0'" in msg and "ONNX Runtime" in msg and "relu.onnx" in msg and "SIGSEGV" in msg and "exit status -11" in msg
    )
    assert "structured.runtime: onnxruntime" in msg and "not in pqd" in msg
    assert err.value.signal == "SIGSEGV"


def test_openvino_crashing_at_a_static_batch_is_timed_with_a_dynamic_batch(tiny_onnx, segv_python, caplog):
    pytest.importorskip("openvino")
    with start_workers({"s0": BASE | {"kind": "openvino", "path": str(tiny_onnx)}}) as ws:
        assert ws["s0"].info["settings"]["batch_shape"] == "dynamic"
        for bs in (1, 2):
            ws["s0"].warmup(bs, 2)
    assert any("SIGSEGV" in r.getMessage() and "dynamic batch" in r.getMessage() for r in caplog.records)


CALLER_THREADING = {
    "OMP_WAIT_POLICY": "PASSIVE",
    "OMP_NUM_THREADS": "7",
    "MKL_NUM_THREADS": "7",
    "KMP_BLOCKTIME": "0",
    "GOMP_SPINCOUNT": "0",
    "OMP_PROC_BIND": "true",
}


def test_worker_environment_is_defined_once_and_ignores_the_callers_threading_variables():
    from pqd.measure.workers import worker_environment

    caller = {"PATH": "/bin", "HOME": "/h", "MALLOC_ARENA_MAX": "2"} | CALLER_THREADING
    we = worker_environment(3, environ=caller)
    assert we.env == {
        "PATH": "/bin",
        "HOME": "/h",
        "MALLOC_ARENA_MAX": "2",
        "OMP_NUM_THREADS": "3",
        "MKL_NUM_THREADS": "3",
    }
    assert not we.inherited and we.ignored == CALLER_THREADING
    rec = we.record()
    assert rec["inherited"] is False and rec["variables"]["OMP_NUM_THREADS"] == "3"
    assert rec["variables"]["OMP_WAIT_POLICY"] is None, "unset: the runtime's default, shown as such"
    inherited = worker_environment(3, inherit_env=True, environ=caller)
    assert inherited.inherited and inherited.env == caller and inherited.ignored == {}
    assert inherited.record()["variables"]["OMP_WAIT_POLICY"] == "PASSIVE"


@pytest.mark.parametrize("threads", [1, 2])
def test_the_worker_sees_the_controlled_environment_whatever_the_caller_sets(scripted, monkeypatch, threads):
    for k, v in CALLER_THREADING.items():
        monkeypatch.setenv(k, v)
    with start_workers({"ts": BASE | {"kind": "torchscript", "path": str(scripted), "threads": threads}}) as ws:
        w = ws["ts"]
        # what the worker process itself found in os.environ, and its torch thread count
        assert w.info["thread_env"] == {"MKL_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
        assert w.info["settings"]["threads"] == threads
        env = w.environment
    assert env["inherited"] is False and env["variables"]["OMP_WAIT_POLICY"] is None
    assert (
        env["variables"]["OMP_NUM_THREADS"] == str(threads)
        and env["ignored_from_caller"]["OMP_WAIT_POLICY"] == "PASSIVE"
    )


def test_inherit_env_times_in_the_callers_environment_and_records_it(scripted, monkeypatch):
    from pqd.measure.workers import workers_environment

    for k, v in CALLER_THREADING.items():
        monkeypatch.setenv(k, v)
    with start_workers(
        {
            "a": BASE | {"kind": "torchscript", "path": str(scripted)},
            "b": BASE | {"kind": "torchscript", "path": str(scripted)},
        },
        inherit_env=True,
    ) as ws:
        # the caller's threading variables, all of them (libraries imported earlier, e.g. sklearn, may have added some)
        assert ws["a"].info["thread_env"] == thread_variables(os.environ)
        assert ws["a"].info["thread_env"].items() >= CALLER_THREADING.items()
        assert ws["a"].info["settings"]["threads"] == 1, "the runtime's own thread count is still the one asked for"
        env = workers_environment(ws)
    assert env["inherited"] is True and env["ignored_from_caller"] == {}
    assert {k: env["variables"][k] for k in CALLER_THREADING} == CALLER_THREADING


PLANTED = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\nraise SystemExit('planted module ran')\n"


def test_a_module_in_the_working_folder_never_replaces_the_standard_library(scripted, tmp_path, monkeypatch):
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    marker = tmp_path / "planted-ran"
    for name in ("json", "contextlib", "numpy"):
        (hostile / f"{name}.py").write_text(PLANTED.format(marker=str(marker)))
    monkeypatch.chdir(hostile)
    with start_workers({"ts": BASE | {"kind": "torchscript", "path": str(scripted)}}) as ws:
        times, _ = ws["ts"].block(1, settle_ms=0, timed=2)
    assert len(times) == 2 and not marker.exists()


def test_a_user_model_folder_on_sys_path_reaches_the_worker_after_the_standard_library(tmp_path, monkeypatch):
    from pqd.train.checkpoint import save_checkpoint

    user = tmp_path / "user"
    user.mkdir()
    (user / "latenv_user_model.py").write_text(
        "from torch import nn\n\ndef make(num_classes=10):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(48, num_classes))\n"
    )
    marker = tmp_path / "planted-ran"
    (user / "json.py").write_text(PLANTED.format(marker=str(marker)))  # beside the model: still not the stdlib's json
    monkeypatch.syspath_prepend(str(user))
    from latenv_user_model import make

    weights = save_checkpoint(tmp_path / "w.safetensors", make(num_classes=5).state_dict())
    spec = BASE | {
        "kind": "eager",
        "model": "latenv_user_model:make",
        "kwargs": {},
        "num_classes": 5,
        "weights": str(weights),
    }
    with start_workers({"user": spec}) as ws:
        times, _ = ws["user"].block(1, settle_ms=0, timed=2)
    assert len(times) == 2 and not marker.exists()
