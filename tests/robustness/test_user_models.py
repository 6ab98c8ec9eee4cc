"""User models given by import path: they compress to INT8 with the integer model agreeing with its
fake-quant simulation, or fail early with a ModelError naming the module; layers the x86 quantizer
leaves in float are listed in metrics.json["quantization"]["float_modules"] and logged."""

from __future__ import annotations

import logging

import pytest
import torch
from rbhelpers import tiny

from pqd.errors import ModelError
from pqd.run.config import RunConfig
from pqd.run.pipeline import run_pipeline


def _config(factory: str, stages: str = "P:1,Q:1,D:1", teacher_epochs: int = 6) -> RunConfig:
    return RunConfig.from_dict(
        tiny(
            stages=stages,
            model={"name": f"pqd_user_models:{factory}", "width": 1.0},
            data={"train_subset": 512, "test_subset": 256},
            teacher={"epochs": teacher_epochs, "lr": 0.1},
        )
    )


@pytest.mark.parametrize(
    "factory, float_ops",
    [
        ("mobilenet", []),  # depthwise-separable convs, ReLU6
        ("densenet", []),  # torch.cat skips
        ("functional", []),  # F.relu / F.hardswish / x.relu(); Tensor.flatten keeps the quantized tensor
        ("float_layers", ["act", "silu"]),  # nn.GELU and F.silu stay float; LayerNorm is quantized
    ],
)
def test_user_architecture_compresses_to_a_faithful_int8_model(factory, float_ops, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pqd")
    m = run_pipeline(_config(factory), tmp_path)
    acc = m["accuracy"]
    assert m["final_form"] == "int8" and (tmp_path / "model_int8.pt").is_file()
    assert acc["final_top1"] >= 0.4, (
        "the model must have learned something (chance is 0.1) for agreement to mean anything"
    )
    assert acc["int8_vs_fake_quant_agreement"] >= 0.93, acc
    assert abs(acc["final_top1"] - acc["fake_quant_top1"]) <= 0.03, acc
    assert m["sparsity"]["achieved"] == pytest.approx(0.5, abs=0.01)
    assert m["sparsity"]["achieved_int8"] >= 0.49, "pruned zeros must survive conversion"
    assert [f["name"] for f in m["quantization"]["float_modules"]] == float_ops
    warned = [r.getMessage() for r in caplog.records if "stay FP32" in r.getMessage()]
    if float_ops:
        assert len(warned) == 1 and all(name in warned[0] for name in float_ops)
    else:
        assert not warned


def test_untraceable_model_fails_before_training_naming_the_module(tmp_path):
    with pytest.raises(ModelError, match=r"torch.fx could not trace it.*'gate' \(Gate\)"):
        run_pipeline(_config("untraceable"), tmp_path)
    assert not (tmp_path / "teacher.safetensors").exists() and not (tmp_path / "teacher.epoch.safetensors").exists(), (
        "the trace error must come before the teacher trains"
    )


def test_untraceable_model_without_quantize_stage_runs_in_fp32(tmp_path):
    m = run_pipeline(_config("untraceable", stages="P:1", teacher_epochs=1), tmp_path)
    assert m["final_form"] == "fp32" and m["quantization"] is None
    assert m["sparsity"]["achieved"] == pytest.approx(0.5, abs=0.01)


def test_model_with_wrong_output_shape_is_refused_before_training(tmp_path):
    cfg = RunConfig.from_dict(tiny(model={"name": "pqd_user_models:fixed_1000_classes", "width": 1.0}))
    with pytest.raises(ModelError, match=r"returns \(2, 1000\).*expected logits of shape \(2, 10\)"):
        run_pipeline(cfg, tmp_path)
    assert not (tmp_path / "teacher.epoch.safetensors").exists()


def test_control_flow_frozen_into_the_int8_file_is_recorded_naming_the_module(tmp_path):
    """quantize.leaf_modules keeps the data-dependent branch out of torch.fx, but TorchScript tracing freezes it:
    metrics.json's warnings (and so the summary) say so, naming the module."""
    cfg = _config("untraceable", stages="Q:1", teacher_epochs=1)
    cfg = RunConfig.from_dict(cfg.to_dict() | {"quantize": cfg.to_dict()["quantize"] | {"leaf_modules": ["gate"]}})
    m = run_pipeline(cfg, tmp_path)
    assert m["final_form"] == "int8"
    frozen = [w for w in m.get("warnings", []) if "froze data-dependent control flow" in w]
    assert len(frozen) == 1 and "module 'gate' (Gate)" in frozen[0], m.get("warnings")


def test_trace_names_the_module_whose_branch_it_froze():
    from pqd_user_models import untraceable

    from pqd.compress.qat import to_torchscript
    from pqd.errors import FrozenBranchWarning

    with pytest.warns(FrozenBranchWarning, match=r"module 'gate' \(Gate\) at pqd_user_models.py:\d+"):
        to_torchscript(untraceable(10), torch.zeros(1, 3, 32, 32))


def test_tracing_an_int8_model_without_branches_warns_nothing():
    """torch's own quantized operators raise TracerWarnings while tracing (a scale read as a float);
    they are no branch of the model's code, so no FrozenBranchWarning reaches the user."""
    import warnings

    from pqd.compress.qat import convert, prepare_qat
    from pqd.deploy.deployable import deployable_torchscript
    from pqd.errors import FrozenBranchWarning
    from pqd.models.registry import create_model

    qat = prepare_qat(create_model("resnet18", num_classes=10, width=0.125).eval(), torch.zeros(2, 3, 32, 32))
    qat(torch.rand(4, 3, 32, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FrozenBranchWarning)
        deployable_torchscript(
            convert(qat),
            mean=(0.5,) * 3,
            std=(0.25,) * 3,
            class_names=[str(i) for i in range(10)],
            input_shape=(3, 32, 32),
        )
