"""torchvision:<name> and timm:<name> models: built by name, no --allow-code, weights by state_dict."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import pqd.models.external as external
from pqd.compress.channels.graph import ChannelGraph, prune_to_widths
from pqd.compress.qat import convert, float_modules, prepare_qat
from pqd.config import ModelConfig
from pqd.errors import ModelError, UntrustedCodeError
from pqd.models.registry import create_model
from pqd.safety.trustpolicy import check_config_code, is_import_path
from pqd.train.checkpoint import load_weights, state_dict_mismatch

try:  # a torchvision built for another torch raises RuntimeError on import: skip, as for a missing one
    import timm
    import torchvision
except (ImportError, RuntimeError) as exc:
    pytest.skip(f"torchvision/timm not importable: {exc}", allow_module_level=True)


def test_torchvision_model_by_name_with_width_and_classes():
    m = create_model("torchvision:mobilenet_v2", num_classes=5, width=0.25)
    assert m(torch.zeros(2, 3, 32, 32)).shape == (2, 5)
    assert m.features[0][0].out_channels == 8  # 32 * 0.25, rounded to 8


def test_timm_model_by_name():
    m = create_model("timm:test_efficientnet", num_classes=4).eval()
    assert m(torch.zeros(1, 3, 32, 32)).shape == (1, 4)
    assert not any(type(x) is timm.layers.BatchNormAct2d for x in m.modules())


@pytest.mark.parametrize(
    "name, kw, match",
    [
        ("torchvision:resnet18", {"width": 0.5}, "no width multiplier"),
        ("torchvision:resnet_18", {}, "torchvision has no model"),
        ("timm:no_such_net", {}, "timm has no model"),
        ("torchvision:resnet18", {"dropout": 0.2}, "model.dropout"),
    ],
)
def test_bad_names_and_options(name, kw, match):
    with pytest.raises(ModelError, match=match):
        create_model(name, num_classes=3, **kw)


def test_missing_library_names_the_extra(monkeypatch):
    def fail(name):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(external.importlib, "import_module", fail)
    with pytest.raises(ModelError, match=r"pip install 'pqd\[timm\]'"):
        create_model("timm:efficientnet_b0", num_classes=3)


def test_library_names_are_not_user_code():
    assert not is_import_path("torchvision:resnet50") and not is_import_path("timm:efficientnet_b0")
    assert is_import_path("mypkg.models:make_net")
    check_config_code({"model": {"name": "torchvision:mobilenet_v2"}}, allow_code=False)  # no error
    with pytest.raises(UntrustedCodeError):
        check_config_code({"model": {"name": "mypkg:make"}}, allow_code=False)
    assert ModelConfig(name="timm:efficientnet_b0").name == "timm:efficientnet_b0"


def test_weights_from_torchvision_pth_and_mismatch_named(tmp_path):
    src = torchvision.models.resnet18(num_classes=10)
    torch.save(src.state_dict(), tmp_path / "r18.pth")  # how torchvision saves weights
    state = load_weights(tmp_path / "r18.pth")
    fits = create_model("torchvision:resnet18", num_classes=10)
    assert state_dict_mismatch(fits, state) is None
    other = create_model("torchvision:resnet18", num_classes=3)
    msg = state_dict_mismatch(other, state)
    assert "fc.weight (10, 512) vs (3, 512)" in msg and "fc.bias" in msg
    wrong = create_model("torchvision:mobilenet_v2", num_classes=10)
    msg = state_dict_mismatch(wrong, state)
    assert "missing keys: features.0.0.weight" in msg and "unexpected keys: conv1.weight" in msg and "in all" in msg


def test_timm_flat_keys_load_after_the_split(tmp_path):
    ref = timm.create_model("test_efficientnet", pretrained=False, num_classes=3)  # timm's own layout
    with torch.no_grad():
        ref.bn1.running_mean.uniform_()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "w.safetensors"))
    m = create_model("timm:test_efficientnet", num_classes=3)
    m.load_state_dict(load_weights(tmp_path / "w.safetensors"))
    assert torch.equal(m.bn1[0].running_mean, ref.bn1.running_mean)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(m.eval()(x), ref.eval()(x), atol=1e-5)


@pytest.mark.parametrize(
    "name, kw, float_types",
    [
        ("torchvision:mobilenet_v3_small", {"width": 0.25}, set()),  # hardswish and SE quantized
        ("timm:test_efficientnet", {}, {"SiLU"}),  # SiLU has no x86 integer kernel: FP32, listed
    ],
)
def test_fx_int8_and_float_modules(name, kw, float_types):
    x = torch.randn(2, 3, 32, 32)
    qat = prepare_qat(create_model(name, num_classes=3, **kw), x)
    qat(x)
    int8 = convert(qat.eval())
    assert int8(x).shape == (2, 3)
    assert float_types <= {f["type"] for f in float_modules(int8)}
    if not float_types:
        assert float_modules(int8) == []


@pytest.mark.parametrize(
    "name, kw", [("torchvision:mobilenet_v3_small", {"width": 0.5}), ("timm:test_efficientnet", {})]
)
def test_channel_groups_through_depthwise_and_se_prune_and_quantize(name, kw):
    pytest.importorskip("torch_pruning")
    x = torch.randn(2, 3, 32, 32)
    model = create_model(name, num_classes=3, **kw).eval()
    graph = ChannelGraph(model, x)
    keep = {g.id: max(8, g.channels // 2) for g in graph.groups}
    pruned = prune_to_widths(model, keep, example=x, round_to=8)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters()) / 2
    qat = prepare_qat(pruned, x)
    qat(x)
    assert convert(qat.eval())(x).shape == (2, 3)
