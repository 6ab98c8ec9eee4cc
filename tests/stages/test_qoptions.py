import pytest
import torch

from pqd.compress.qat import convert, prepare
from pqd.compress.qoptions import QuantOptions, quant_options
from pqd.compress.student import Student
from pqd.errors import ConfigError
from pqd.models.registry import create_model
from pqd.run.config import RunConfig
from pqd.run.loader import load_run
from pqd.run.pipeline import run_pipeline
from pqd.stages.quantize import QuantizeConfig, quantize


def _model():
    torch.manual_seed(0)
    return create_model("resnet18", num_classes=4, width=0.125)


def _weight_qschemes(int8):
    out = set()
    for m in int8.modules():
        w = getattr(m, "weight", None)
        if callable(w):
            out.add(w().qscheme())
    return out


@pytest.mark.parametrize(
    "granularity, symmetric, expect",
    [
        (
            "per_channel",
            True,
            {torch.per_channel_affine},
        ),  # symmetric per-channel is stored as affine with zero points 0
        ("per_tensor", True, {torch.per_tensor_affine}),
        ("per_channel", False, {torch.per_channel_affine}),
        ("per_tensor", False, {torch.per_tensor_affine}),
    ],
)
@pytest.mark.parametrize("mode", ["ptq", "qat"])
def test_weight_options_reach_the_int8_weights(mode, granularity, symmetric, expect):
    x = torch.randn(8, 3, 16, 16)
    opts = QuantOptions(granularity=granularity, symmetric=symmetric)
    p = prepare(_model(), x, mode=mode, options=opts)
    p.eval()(x)
    int8 = convert(p)
    assert _weight_qschemes(int8) == expect
    conv = int8.get_submodule("layer1.0.conv1").weight()
    zp = conv.q_per_channel_zero_points() if granularity == "per_channel" else torch.tensor([conv.q_zero_point()])
    assert bool((zp == 0).all()) == symmetric  # affine weights get zero points of their own
    if granularity == "per_tensor":
        assert (
            len({round(m.weight().q_scale(), 12) for m in int8.modules() if callable(getattr(m, "weight", None))}) > 1
        )


def test_dynamic_quantizes_only_linear_layers(tiny_data):
    out = quantize(Student(_model()), QuantizeConfig(mode="dynamic"), data=tiny_data, epochs=0)
    assert out.form == "dynamic" and out.quantized
    int8 = convert(out.model)
    assert type(int8.get_submodule("fc")).__module__.startswith("torch.ao.nn.quantized.dynamic")
    assert type(int8.get_submodule("conv1")).__name__ in ("Conv2d", "ConvReLU2d") and not hasattr(
        int8.get_submodule("conv1"), "scale"
    )


def test_config_rules_and_options():
    with pytest.raises(ConfigError, match="takes no epochs"):
        RunConfig.from_dict({"stages": "Q:2", "quantize": {"mode": "dynamic"}})
    with pytest.raises(ConfigError, match="last stage"):
        RunConfig.from_dict({"stages": "Q:0,D:2", "quantize": {"mode": "dynamic"}})
    with pytest.raises(ConfigError, match="quantize.granularity"):
        QuantizeConfig(granularity="per_group")
    assert quant_options(QuantizeConfig(granularity="per_tensor", symmetric=False)).label() == "per_tensor/affine"


def test_dynamic_run_measured_like_any_variant(digits_config, tmp_path):
    cfg = RunConfig.from_dict(digits_config | {"stages": "Q:0", "quantize": {"mode": "dynamic"}})
    m = run_pipeline(cfg, tmp_path / "dyn")
    assert m["final_form"] == "int8" and m["quantize_mode"] == "dynamic"
    assert {r["model"] for r in m["latency"]} == {"teacher_fp32", "final_int8"}
    assert m["accuracy"]["int8_vs_fp32_agreement"] >= 0.95


def test_per_tensor_affine_qat_run_reloads(digits_config, tmp_path):
    """The run's weight scheme is rebuilt from its config when the run is loaded again."""
    cfg = RunConfig.from_dict(
        digits_config | {"stages": "Q:1", "quantize": {"granularity": "per_tensor", "symmetric": False}}
    )
    m = run_pipeline(cfg, tmp_path)
    loaded = load_run(tmp_path)
    scheme = loaded.student.model.get_submodule("layer1.0.conv1").weight_fake_quant.qscheme
    assert scheme == torch.per_tensor_affine and m["quantize_mode"] == "qat"
