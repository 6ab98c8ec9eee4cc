import pytest
import torch

from pqd.compress.student import Student
from pqd.config import TrainConfig
from pqd.errors import ConfigError, ModelError
from pqd.models.registry import create_model
from pqd.run.config import RunConfig
from pqd.run.metrics import Metrics
from pqd.run.pipeline import run_pipeline
from pqd.stages.joint import JointConfig, joint
from pqd.stages.protocol import get_stage

CFG = TrainConfig(batch_size=32, progress=False)


def _model():
    torch.manual_seed(0)
    return create_model("resnet18", num_classes=4, width=0.125)


def test_joint_prunes_fake_quantizes_and_distills_in_one_loop(tiny_data):
    teacher = _model().eval()
    out = joint(
        Student(_model()), JointConfig(sparsity=0.6), teacher=teacher, data=tiny_data, epochs=2, train_config=CFG
    )
    assert out.form == "qat" and out.quantized
    assert any("FakeQuantize" in type(m).__name__ for m in out.model.modules())
    pruned = sum(int((~m).sum()) for m in out.masks.values()) / sum(m.numel() for m in out.masks.values())
    assert pruned == pytest.approx(0.6, abs=1e-3)
    for path, mask in out.masks.items():
        assert torch.all(out.model.get_submodule(path).weight.detach()[~mask] == 0)
    with pytest.raises(ModelError, match="already quantized"):
        joint(out, JointConfig(), teacher=teacher, data=tiny_data, epochs=1, train_config=CFG)
    with pytest.raises(ModelError, match="no teacher"):
        joint(Student(_model()), JointConfig(), teacher=None, data=tiny_data, epochs=1, train_config=CFG)


def test_joint_config_rules():
    assert get_stage("J").quantizes and get_stage("jpqd").name == "joint"
    with pytest.raises(ConfigError, match="quantizes 2 times"):
        RunConfig.from_dict({"stages": "J:2,Q:2"})
    with pytest.raises(ConfigError, match="needs epochs"):
        RunConfig.from_dict({"stages": "J:0"})
    RunConfig.from_dict({"stages": "L:3,J:2"})  # IMP ticket, then joint compression


def test_joint_run_exports_sparse_int8(digits_config, tmp_path):
    cfg = RunConfig.from_dict(
        digits_config | {"stages": "J:2", "joint": {"sparsity": 0.5}, "quantize": {"granularity": "per_tensor"}}
    )
    m = run_pipeline(cfg, tmp_path)
    assert m["final_form"] == "int8" and m["quantize_mode"] == "qat" and m["stage_order"] == ["joint"]
    assert m["sparsity"]["target"] == 0.5 and m["prune_criterion"] == "magnitude"
    assert m["sparsity"]["achieved_int8"] >= 0.5 - 0.01
    assert m["accuracy"]["int8_vs_fake_quant_agreement"] >= 0.95
    assert m["stage_records"][0]["records"]["weights"] == "per_tensor/symmetric"
    deg = Metrics.from_dict(m).degradation  # finalize stores the degradation profile, typed
    assert deg == m["degradation"] and deg["min_slice"] == 25 and isinstance(deg["slice_failure"], bool)
    assert [lv["slices"] for lv in deg["final"]["levels"]] == [
        1,
        2,
        4,
        8,
    ]  # 200 test images: slices of 200, 100, 50, 25
    assert Metrics.from_dict(m).stage_label == "J"
