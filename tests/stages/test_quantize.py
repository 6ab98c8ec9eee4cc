import pytest
import torch

from pqd.compress.qat import to_torchscript
from pqd.compress.student import Student, convert_student
from pqd.config import TrainConfig
from pqd.errors import ModelError
from pqd.measure import agreement, predict, top1
from pqd.models.registry import create_model
from pqd.stages.prune import PruneConfig, prune
from pqd.stages.quantize import QuantizeConfig, quantize
from pqd.train import train

CFG = TrainConfig(batch_size=32, progress=False)


@pytest.fixture(scope="module")
def trained(tiny_data):
    torch.manual_seed(0)
    m = create_model("resnet18", num_classes=4, width=0.125)
    return train(m, tiny_data, epochs=3, lr=0.05, config=CFG)


def _copy(m):
    import copy

    return copy.deepcopy(m)


def test_qat_keeps_masks_and_int8_agrees_with_fake_quant(tiny_data, trained):
    s = prune(Student(_copy(trained)), PruneConfig(sparsity=0.6), data=tiny_data, epochs=2, train_config=CFG)
    q = quantize(s, QuantizeConfig(mode="qat"), data=tiny_data, epochs=2, train_config=CFG)
    assert q.form == "qat" and set(q.masks) == set(s.masks)
    # fake-quantized weights at pruned positions are exactly zero
    for path, mask in q.masks.items():
        mod = q.model.get_submodule(path)
        fq = mod.weight_fake_quant(mod.weight)
        assert torch.all(fq[~mask] == 0), path
    int8 = convert_student(q)
    for path, mask in q.masks.items():
        w = int8.get_submodule(path).weight()
        assert w.dtype == torch.qint8
        assert torch.all(w.int_repr()[~mask] == 0), f"pruned position non-zero in INT8 weight of {path}"
        assert torch.all(w.q_per_channel_zero_points() == 0), "weights must be symmetric"
    fq_logits = predict(q.model, tiny_data.test, mean=tiny_data.mean, std=tiny_data.std)
    i8_logits = predict(
        to_torchscript(int8, torch.zeros(1, 3, 16, 16)), tiny_data.test, mean=tiny_data.mean, std=tiny_data.std
    )
    # Both outputs are 8-bit quantized logits; the real kernels may round one step away from the
    # simulation, which flips exact ties. Judge agreement where the fake-quant winner is clear.
    step = fq_logits.unique().diff().min()
    top2 = fq_logits.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * step
    assert clear.float().mean() > 0.5
    assert agreement(fq_logits[clear], i8_logits[clear]) >= 0.99
    # Below the simulated 7-bit clamp (x86 reduce_range; the real kernels saturate at 8 bits,
    # here and in hidden layers) the two agree to within a few output steps.
    inside = fq_logits.abs() < fq_logits.abs().max() - step / 2
    assert (fq_logits - i8_logits)[inside].abs().max() <= 5 * step + 1e-6
    assert top1(i8_logits, tiny_data.test.y) > 0.5


def test_ptq_calibrates_without_training(tiny_data, trained):
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    q = quantize(
        Student(_copy(trained)),
        QuantizeConfig(mode="ptq", calibration_batches=2),
        data=tiny_data,
        epochs=0,
        train_config=CFG,
    )
    assert q.form == "ptq"
    int8 = convert_student(q)
    acc = top1(predict(int8, tiny_data.test, mean=tiny_data.mean, std=tiny_data.std), tiny_data.test.y)
    ref = top1(predict(trained, tiny_data.test, mean=tiny_data.mean, std=tiny_data.std), tiny_data.test.y)
    assert acc >= ref - 0.1
    assert all(torch.equal(before[k], v) for k, v in trained.state_dict().items()), "input model must be untouched"


def test_float_modules_stay_fp32_inside_the_int8_model(tiny_data, trained):
    q = quantize(
        Student(_copy(trained)),
        QuantizeConfig(mode="ptq", calibration_batches=2, float_modules=("conv1", "layer1.0.conv2")),
        data=tiny_data,
        epochs=0,
        train_config=CFG,
    )
    int8 = convert_student(q)
    kinds = {n: type(m).__module__ for n, m in int8.named_modules()}
    assert ".quantized." not in kinds["conv1"] and ".quantized." not in kinds["layer1.0.conv2"]
    assert ".quantized." in kinds["layer1.0.conv1"]  # its neighbour is still INT8
    x = torch.randn(2, *tiny_data.image_shape)
    assert torch.isfinite(int8(x)).all()
    with pytest.raises(ModelError, match="float_modules: 'nope' is not a submodule path"):
        quantize(
            Student(_copy(trained)),
            QuantizeConfig(mode="ptq", float_modules=("nope",)),
            data=tiny_data,
            epochs=0,
            train_config=CFG,
        )


def test_quantize_twice_and_convert_fp32_are_errors(tiny_data, trained):
    with pytest.raises(ModelError, match="quantize stage first"):
        convert_student(Student(trained))
    with pytest.raises(ModelError, match="already quantized"):
        quantize(Student(trained, form="qat"), QuantizeConfig(), data=tiny_data, epochs=1, train_config=CFG)


class _Untraceable(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            y = y * 2
        return self.fc(y.mean((2, 3)))


def test_untraceable_model_gets_a_clear_error(tiny_data):
    with pytest.raises(ModelError, match="_Untraceable.*torch.fx could not trace"):
        quantize(Student(_Untraceable()), QuantizeConfig(), data=tiny_data, epochs=1, train_config=CFG)


@pytest.mark.parametrize("name", ["resnet18", "vgg16_bn", "wrn_28_10"])
def test_builtin_models_quantize_completely(name):
    """Every op of the built-in backbones runs on integer kernels: nothing is left in float."""
    from pqd.compress.qat import float_modules, prepare

    m = prepare(create_model(name, width=0.125), torch.zeros(2, 3, 32, 32), mode="ptq")
    m(torch.randn(4, 3, 32, 32))
    assert float_modules(convert_student(Student(m, form="ptq"))) == []


class _Gate(torch.nn.Module):
    def forward(self, x):
        if x.mean() > 0:  # data-dependent control flow
            return x * 2
        return x


class _Gated(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.gate, self.fc = torch.nn.Conv2d(3, 4, 3), _Gate(), torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(self.gate(self.conv(x)).mean((2, 3)))


def test_prepare_qat_and_ptq_take_leaf_modules_and_the_error_names_the_keyword_and_the_yaml_key():
    from pqd.compress.qat import prepare_ptq, prepare_qat

    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ModelError) as err:
        prepare_qat(_Gated(), x)
    assert "leaf_modules=['<its path>']" in str(err.value) and "quantize.leaf_modules:" in str(err.value)
    assert "gate" in str(err.value)
    assert prepare_qat(_Gated(), x, leaf_modules=["gate"])(x).shape == (2, 4)
    assert prepare_ptq(_Gated(), x, leaf_modules=["gate"])(x).shape == (2, 4)


class _Flattens(torch.nn.Module):
    """The flatten spellings users write: nn.Flatten, Tensor.flatten, torch.flatten, view, reshape."""

    def __init__(self):
        super().__init__()
        self.conv, self.relu = torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()
        self.pool, self.flat = torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
        self.fc1, self.fc2, self.fc3 = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)

    def forward(self, x):
        y = self.pool(self.relu(self.conv(x)))
        return (
            self.fc1(self.flat(y))
            + self.fc2(y.flatten(1))
            + self.fc3(torch.flatten(y, 1))
            + self.fc1(y.view(y.size(0), -1))
            + self.fc2(y.reshape(-1, 8))
        )


@pytest.mark.parametrize("mode", ["ptq", "qat"])
def test_flatten_keeps_the_tensor_quantized(mode):
    from pqd.compress.qat import calibrate, float_modules, freeze, prepare
    from pqd.compress.qat import convert as convert_model

    torch.manual_seed(0)
    x = torch.randn(16, 3, 8, 8)
    prepared = prepare(_Flattens(), x, mode=mode)
    calibrate(prepared, [x])
    if mode == "qat":
        freeze(prepared.eval())
    int8 = convert_model(prepared)
    assert float_modules(int8) == []
    for node in int8.graph.nodes:
        if node.op == "call_method" and node.target == "dequantize":
            # the only dequantize left hands the float logits to the caller
            assert [u.op for u in node.users] == ["output"], node.format_node()
    flat = [n for n in int8.graph.nodes if n.target in ("flatten", "flat")]
    assert len(flat) == 2 and all(u.target is not torch.quantize_per_tensor for n in flat for u in n.users)
    with torch.no_grad():
        assert torch.allclose(int8(x), prepared.eval()(x), atol=0.1)
        assert torch.equal(to_torchscript(int8, x)(x), int8(x))
