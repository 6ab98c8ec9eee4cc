import importlib.util
import json
import sys

import numpy as np
import pytest
import torch

import pqd
from pqd.commands.peers import NncfPtqConfig, nncf_ptq, peer_worker_spec, time_peer
from pqd.commands.peers.nncf_ptq import ARTEFACTS, PREDICTIONS, RECORD, TEACHER_ONNX
from pqd.errors import ConfigError, PqdError

HAVE_NNCF = importlib.util.find_spec("nncf") is not None
HAVE_OV = importlib.util.find_spec("openvino") is not None
HAVE_ORT = importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnxscript") is not None
needs = pytest.mark.skipif(
    not (HAVE_NNCF and HAVE_OV and HAVE_ORT),
    reason="NNCF peer baseline needs the extras: pip install 'pqd[peers,openvino]'",
)


@pytest.fixture(scope="module")
def digits_teacher(tiny_teacher):
    """The shared trained tiny teacher (ResNet-18 x0.125 on digits) and a small digits split."""
    from pqd.data import load_data
    from pqd.models.registry import create_model
    from pqd.train.checkpoint import load_weights

    data = load_data(pqd.DataConfig(dataset="digits", train_subset=300, test_subset=100))
    model = create_model("resnet18", num_classes=data.num_classes, width=0.125)
    model.load_state_dict(load_weights(tiny_teacher["weights"]))
    return model.eval(), data


def test_config_validates():
    with pytest.raises(ConfigError):
        NncfPtqConfig(backend="tensorrt")
    with pytest.raises(ConfigError):
        NncfPtqConfig(calibration_size=0)
    with pytest.raises(ConfigError):
        NncfPtqConfig(preset="fast")


def test_missing_nncf_names_the_extra(monkeypatch, tmp_path, tiny_data):
    monkeypatch.setitem(sys.modules, "nncf", None)  # import nncf -> ImportError
    with pytest.raises(PqdError, match=r"pqd\[peers\]"):
        nncf_ptq(torch.nn.Linear(2, 2), tiny_data, tmp_path)


@needs
def test_nncf_ptq_openvino_on_a_tiny_model(digits_teacher, tmp_path):
    teacher, data = digits_teacher
    rec = nncf_ptq(teacher, data, tmp_path, config=NncfPtqConfig(calibration_size=64, threads=2))
    assert (tmp_path / ARTEFACTS["openvino"]).is_file() and (tmp_path / "nncf_int8.bin").is_file()
    assert (tmp_path / TEACHER_ONNX).is_file()
    assert rec["runtime"] == "openvino" and rec["precision"] == "int8" and rec["calibration"]["images"] == 64
    ev = rec["evaluation"]
    assert ev["n"] == 100 and ev["top1"]["n"] == 100 and ev["top1"]["method"] == "wilson"
    assert ev["top1"]["ci_low"] <= ev["top1"]["top1"] <= ev["top1"]["ci_high"]
    # the teacher learned something, and INT8 PTQ keeps (nearly) its predictions
    assert ev["teacher_top1"]["top1"] > 0.5
    assert ev["agreement_with_teacher"] >= 0.9
    preds = np.load(tmp_path / PREDICTIONS)
    assert preds.shape == (100,) and preds.dtype == np.int16
    assert (preds == data.test.y.numpy()).mean() == pytest.approx(ev["top1"]["top1"])
    assert json.loads((tmp_path / RECORD).read_text())["evaluation"]["n"] == 100
    # the OpenVINO CPU plugin really runs layers in int8
    from pqd.deploy.runtimes import OpenVinoRunner

    r = OpenVinoRunner(tmp_path / ARTEFACTS["openvino"], threads=1, batch_sizes=(1,))
    assert r.settings["int8_layers"] is None or r.settings["int8_layers"] > 0
    spec = peer_worker_spec(rec, input_shape=data.image_shape, batch_sizes=(1,))
    assert spec["kind"] == "openvino" and spec["path"].endswith("nncf_int8.xml")

    # timed by pqd's worker harness against the same teacher in the same runtime
    lat = time_peer(rec, input_shape=data.image_shape, threads=(1,), batch_sizes=(1,), warmup=2, runs=10)
    assert [(r["model"], r["runtime"], r["precision"]) for r in lat] == [
        ("openvino_fp32", "openvino", "fp32"),
        ("nncf_ptq_int8", "openvino", "int8"),
    ]
    assert all(r["median_ms"] > 0 for r in lat)
    # in the controlled worker environment, recorded with every record
    assert all(
        r["latency_env"]["inherited"] is False and r["latency_env"]["variables"]["OMP_NUM_THREADS"] == "1" for r in lat
    )


@needs
def test_nncf_ptq_onnx_backend_and_calibration_iterable(digits_teacher, tmp_path):
    from pqd.data import batches

    teacher, data = digits_teacher
    loader = ((x, y) for x, y in batches(data.train, batch_size=16, mean=data.mean, std=data.std))
    rec = nncf_ptq(
        teacher, data, tmp_path, config=NncfPtqConfig(backend="onnx", threads=2), calibration=loader, write=False
    )
    assert rec["runtime"] == "onnxruntime" and rec["artefact"]["file"] == ARTEFACTS["onnx"]
    assert rec["calibration"] == {"images": 300, "source": "iterable"}
    assert not (tmp_path / RECORD).exists()
    import onnx

    ops = {n.op_type for n in onnx.load(str(tmp_path / ARTEFACTS["onnx"])).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert rec["evaluation"]["agreement_with_teacher"] >= 0.9


@needs
def test_peer_run_writes_metrics(digits_teacher, tmp_path):
    from pqd.commands.peers import peer_run
    from pqd.train.checkpoint import save_checkpoint

    teacher, _ = digits_teacher
    w = save_checkpoint(tmp_path / "teacher.safetensors", teacher.state_dict())
    cfg = pqd.RunConfig.from_dict(
        {
            "seed": 0,
            "stages": "Q:0",
            "quantize": {"mode": "ptq"},
            "model": {"name": "resnet18", "width": 0.125},
            "data": {"dataset": "digits", "train_subset": 300, "test_subset": 100},
            "train": {"threads": 2, "progress": False},
            "teacher": {"epochs": 4, "weights": str(w)},
            "measure": {"threads": 1, "warmup": 2, "runs": 5, "batch_sizes": [1], "large_batch_runs": 2},
        }
    )
    m = peer_run(cfg, tmp_path / "run", nncf=NncfPtqConfig(calibration_size=32, threads=2))
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["kind"] == "peer" and saved["final_form"] == "int8" and saved["accuracy"]["test_n"] == 100
    assert saved["latency_env"]["inherited"] is False and saved["latency_env"]["variables"]["OMP_NUM_THREADS"] == "1"
    assert (
        m["accuracy"]["final_top1_ci"]["ci_low"]
        <= m["accuracy"]["final_top1"]
        <= m["accuracy"]["final_top1_ci"]["ci_high"]
    )
    same = m["speedup"]["same_runtime"]
    assert (
        len(same) == 1
        and same[0]["numerator"] == "teacher FP32 @ OpenVINO"
        and same[0]["denominator"] == "NNCF PTQ INT8 @ OpenVINO"
    )
    with pytest.raises(PqdError, match="teacher weights"):
        peer_run(cfg, tmp_path / "x", teacher_weights=tmp_path / "missing.safetensors")
