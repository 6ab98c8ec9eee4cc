import shutil
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

from pqd.commands.export import INT8_ONNX, TEACHER_ONNX, export_run
from pqd.deploy.runtimes import require
from pqd.errors import PqdError  # noqa: E402
from pqd.run.loader import load_run


def test_missing_runtime_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # makes `import openvino` raise ImportError
    with pytest.raises(PqdError, match=r"pip install 'pqd\[openvino\]'"):
        require("openvino")
    from pqd.commands.bench import _resolve_runtimes

    with pytest.raises(PqdError, match=r"pqd\[openvino\]"):
        _resolve_runtimes(["pytorch", "openvino"])
    wanted, skipped = _resolve_runtimes(None)  # not asked for by name: skipped, with the reason
    assert "openvino" not in wanted and "pqd[openvino]" in skipped["openvino"]


@pytest.mark.slow
def test_onnx_int8_agrees_with_pytorch_int8(int8_run):
    rec = export_run(int8_run, openvino=False)
    final, teacher = rec["artefacts"]["final"], rec["artefacts"]["teacher_fp32"]
    assert (int8_run / INT8_ONNX).is_file() and (int8_run / TEACHER_ONNX).is_file()
    assert final["ops"]["QuantizeLinear"] > 0 and final["ops"]["DequantizeLinear"] > 0 and final["int8_weights"] == 21
    assert final["bytes"] < teacher["bytes"] / 2, "INT8 weights should take a quarter of the FP32 bytes"
    ort_int8, ort_fp32 = rec["checks"]["onnxruntime_int8"], rec["checks"]["onnxruntime_fp32"]
    assert ort_int8["n"] == 360
    assert ort_int8["agreement"] >= 0.99, ort_int8
    assert ort_fp32["agreement"] >= 0.99 and ort_fp32["max_abs_logit_diff"] < 1e-3, ort_fp32
    # the runtime really is INT8: ONNX Runtime fuses the QDQ pairs into integer operators
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.optimized_model_filepath = str(int8_run / "optimized.onnx")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ort.InferenceSession(str(int8_run / INT8_ONNX), so, providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(str(int8_run / "optimized.onnx")).graph.node}
    assert "QLinearConv" in ops and "Conv" not in ops
    # a second call reuses the files (same sources) instead of exporting again
    mtime = (int8_run / INT8_ONNX).stat().st_mtime_ns
    assert export_run(int8_run, openvino=False)["artefacts"] == rec["artefacts"]
    assert (int8_run / INT8_ONNX).stat().st_mtime_ns == mtime


def test_export_without_the_teacher_then_with_it(int8_run, tmp_path):
    """``teacher=False`` writes and checks the final model only; a later export that wants the teacher adds it."""
    run = tmp_path / "run"
    shutil.copytree(int8_run, run, ignore=shutil.ignore_patterns("*.onnx", "export.json"))
    rec = export_run(run, openvino=False, teacher=False)
    assert set(rec["artefacts"]) == {"final"} and not (run / TEACHER_ONNX).exists()
    assert set(rec["checks"]) == {"onnxruntime_int8"} and rec["checks"]["onnxruntime_int8"]["agreement"] >= 0.99
    mtime = (run / INT8_ONNX).stat().st_mtime_ns
    assert export_run(run, check=False, teacher=False)["artefacts"] == rec["artefacts"]  # reused, not redone
    assert (run / INT8_ONNX).stat().st_mtime_ns == mtime
    rec = export_run(run, check=False)
    assert set(rec["artefacts"]) == {"final", "teacher_fp32"} and (run / TEACHER_ONNX).is_file()


@pytest.mark.slow
def test_int8_initializers_equal_the_pytorch_int8_weights_and_keep_pruned_zeros(int8_run):
    import onnx
    from onnx import TensorProto, numpy_helper

    from pqd.compress.student import convert_student

    export_run(int8_run, check=False)
    run = load_run(int8_run)
    inits = {i.name: i for i in onnx.load(str(int8_run / INT8_ONNX)).graph.initializer}
    int8 = convert_student(run.student)
    assert run.student.masks, "the run was pruned"
    checked = 0
    for path, mask in run.student.masks.items():
        name = next((n for n in (f"{path}.weight_quantized", f"{path}.0.weight_quantized") if n in inits), None)
        assert name is not None, f"no int8 initializer for {path}"
        assert inits[name].data_type == TensorProto.INT8
        q = numpy_helper.to_array(inits[name])
        want = int8.get_submodule(path).weight().int_repr().numpy()
        np.testing.assert_array_equal(q, want)  # bit-identical to model_int8.pt's weights
        assert (q[~mask.cpu().numpy()] == 0).all(), f"{path}: a pruned weight is not zero in the ONNX file"
        checked += 1
    assert checked == len(run.student.masks)
    zeros = sum(int((numpy_helper.to_array(i) == 0).sum()) for i in inits.values() if i.data_type == TensorProto.INT8)
    total = sum(int(np.prod(i.dims)) for i in inits.values() if i.data_type == TensorProto.INT8)
    assert zeros / total >= 0.6 - 0.01
    # no FP32 copy of a conv/linear weight is left behind
    assert not [n for n, i in inits.items() if n.endswith(".weight") and i.data_type == TensorProto.FLOAT]


@pytest.mark.slow
def test_openvino_runs_the_export_in_int8_with_an_f32_hint(int8_run):
    pytest.importorskip("openvino")
    from pqd.deploy.runtimes import OpenVinoRunner

    rec = export_run(int8_run, openvino=True)
    assert rec["checks"]["openvino_int8"]["agreement"] >= 0.99, rec["checks"]["openvino_int8"]
    assert rec["checks"]["openvino_fp32"]["agreement"] >= 0.99
    r = OpenVinoRunner(int8_run / INT8_ONNX, threads=1, batch_sizes=(1,))
    assert r.settings["inference_precision_hint"] == "f32"
    assert r.settings["int8_layers"] and r.settings["int8_layers"] >= 21  # every conv and the classifier run in u8/i8
    assert r(torch.randn(3, 3, 32, 32)).shape == (3, 10)  # another batch size compiles on first use


@pytest.mark.slow
def test_export_never_replaces_files_pqd_did_not_write(int8_run, tmp_path):
    """The user's own model_int8.onnx / teacher_fp32.onnx / export.json in a run folder are
    refused before any work (the rule of bench and report); --force replaces them, and files
    pqd exported itself are replaced on a later export without --force."""
    import shutil

    from pqd.cli import main
    from pqd.commands.export import EXPORT_JSON
    from pqd.errors import RunDirError

    run = tmp_path / "run"
    shutil.copytree(int8_run, run)
    mine = {INT8_ONNX: b"my own int8 model", TEACHER_ONNX: b"my own teacher", EXPORT_JSON: b'{"mine": true}'}
    for name, data in mine.items():
        (run / name).write_bytes(data)
    for name in mine:  # each file alone is enough to refuse
        others = {n: d for n, d in mine.items() if n != name}
        for n in others:
            (run / n).unlink()
        # the shared run may hold pqd's own exports from an earlier test: replaced by the user, those are
        # "changed since pqd wrote it"; either way they are the user's now and refused
        with pytest.raises(
            RunDirError, match=rf"{name}' already exists and (was not written by pqd|was changed since pqd wrote it)"
        ):
            export_run(run, check=False)
        assert (run / name).read_bytes() == mine[name]
        for n, d in others.items():
            assert not (run / n).exists()  # nothing written
            (run / n).write_bytes(d)
    assert main(["export", str(run), "--runtimes", "onnxruntime"]) == 2
    assert all((run / n).read_bytes() == d for n, d in mine.items())
    rec = export_run(run, check=False, force=True)
    assert (run / INT8_ONNX).read_bytes() != mine[INT8_ONNX] and rec["artefacts"]["final"]["file"] == INT8_ONNX
    (run / EXPORT_JSON).unlink()  # not up to date any more: a re-export over pqd's own files needs no --force
    export_run(run, check=False)
    assert (run / EXPORT_JSON).is_file()


def test_export_scratch_lives_in_the_run_folder_and_a_killed_ones_is_removed(tmp_path):
    import signal
    import subprocess
    import tempfile
    import textwrap
    from pathlib import Path

    from pqd.commands.export import scratch_dir

    run = tmp_path / "run"
    run.mkdir()
    before = set(Path(tempfile.gettempdir()).glob("pqd-*"))
    code = textwrap.dedent(f"""
        import os, time
        from pathlib import Path
        from pqd.commands.export import scratch_dir
        with scratch_dir(Path({str(run)!r})) as tmp:
            (Path(tmp) / "ref.safetensors").write_bytes(b"x")
            print(tmp, flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    left = Path(proc.stdout.readline().strip())
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert left.parent == run and left.is_dir()  # a kill leaves it in the run folder, not in the temp folder
    assert set(Path(tempfile.gettempdir()).glob("pqd-*")) - before == set()
    with scratch_dir(run) as tmp:
        assert Path(tmp).parent == run and not left.exists()  # the next export removes the killed one's
    assert list(run.iterdir()) == []
