"""Benchmark workers: a variant in its own process, timed on command; lean for ONNX runtimes."""

import pytest
import torch
from torch import nn

from pqd.measure.latency import Blocks, interleave
from pqd.measure.workers import WorkerError, start_workers

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

    graph = helper.make_graph([helper.make_node("Relu", ["input"], ["logits"])], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 4, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3, 4, 4])])
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
        recs = interleave({"local": local, "ts": ws["ts"]}, batch_sizes=(1,), threads=1, warmup=1, runs=6,
                          blocks=Blocks(timed=4, settle_ms=0))
    assert [(r["model"], r["runs"], r["blocks"]["rounds"]) for r in recs] == [("local", 6, 2), ("ts", 6, 2)]


def test_a_worker_that_cannot_load_names_the_variant_and_the_cause(tmp_path):
    with pytest.raises(WorkerError, match=r"'broken'.*(No such file|not exist|open file)"), \
            start_workers({"broken": BASE | {"kind": "torchscript", "path": str(tmp_path / "missing.pt")}}):
        pass
    with pytest.raises(WorkerError, match="unknown worker kind 'tensorrt'"), start_workers({"bad": BASE | {"kind": "tensorrt"}}):
        pass
