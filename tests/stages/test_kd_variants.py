import pytest
import torch
import torch.nn.functional as F

from pqd.compress.kd_variants import (
    AttentionLoss,
    FeatureTaps,
    HintLoss,
    MutualLearningLoss,
    SelfDistillationLoss,
    attention_map,
    auto_layers,
)
from pqd.compress.qat import prepare
from pqd.compress.sparsity import GlobalPruner
from pqd.compress.student import Student
from pqd.config import TrainConfig
from pqd.errors import ConfigError, ModelError
from pqd.models.registry import create_model
from pqd.run.config import RunConfig
from pqd.run.pipeline import run_pipeline
from pqd.stages.distill import DistillConfig
from pqd.stages.distill_variants import distill_variant

CFG = TrainConfig(batch_size=32, progress=False)


def _model(width=0.125, seed=0):
    torch.manual_seed(seed)
    return create_model("resnet18", num_classes=4, width=width)


# ---------------------------------------------------------------- loss modules


def test_hint_loss_identity_when_widths_match_and_adapters_learn_when_they_differ():
    f = [torch.randn(2, 8, 4, 4)]
    same = HintLoss([8], [8])
    assert isinstance(same.adapters[0], torch.nn.Identity)
    assert same(f, f).item() == 0.0
    assert same([f[0] + 1.0], f).item() == pytest.approx(1.0)
    diff = HintLoss([8], [16])
    assert isinstance(diff.adapters[0], torch.nn.Conv2d) and diff.adapters[0].weight.shape == (16, 8, 1, 1)
    loss = diff(f, [torch.randn(2, 16, 8, 8)])  # spatial sizes differ too: pooled to the smaller
    loss.backward()
    assert diff.adapters[0].weight.grad is not None and diff.adapters[0].weight.grad.abs().sum() > 0


def test_attention_loss_is_scale_free_and_channel_count_free():
    s = torch.rand(2, 8, 4, 4)
    at = AttentionLoss()
    assert at([s], [3.0 * s]).item() == pytest.approx(0.0, abs=1e-7)  # attention maps are normalised
    t = torch.rand(2, 32, 4, 4)  # different channel count: no adapter needed
    assert at([s], [t]).item() > 0
    q = attention_map(s)
    assert q.shape == (2, 16) and torch.allclose(q.norm(dim=1), torch.ones(2))


def test_feature_losses_are_tensors_and_refuse_unpaired_features():
    a, b = torch.randn(2, 4, 6, 6), torch.randn(2, 8, 3, 3)
    assert isinstance(AttentionLoss()([], []), torch.Tensor)
    with pytest.raises(ValueError):  # one teacher map short: not silently dropped
        AttentionLoss()([a, a], [b])
    with pytest.raises(ValueError):
        HintLoss([4], [8])([a, a], [b, b])


def test_mutual_learning_gradient_of_each_student_is_its_own_term():
    torch.manual_seed(0)
    z1, z2 = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0])
    MutualLearningLoss(temperature=1.0)([z1, z2], y).backward()
    a = z1.detach().clone().requires_grad_()
    own = F.cross_entropy(a, y) + F.kl_div(F.log_softmax(a, 1), F.softmax(z2.detach(), 1), reduction="batchmean")
    own.backward()
    assert torch.allclose(z1.grad, a.grad, atol=1e-6)
    with pytest.raises(ConfigError, match="two students"):
        MutualLearningLoss()([z1], y)


def test_self_distillation_teaches_heads_from_the_detached_final_output():
    sd = SelfDistillationLoss([8], 3, temperature=2.0, alpha=0.0, beta=1.0)
    z = torch.randn(4, 3, requires_grad=True)
    feat = torch.randn(4, 8, 2, 2, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0])
    sd(z, [feat], y).backward()
    a = z.detach().clone().requires_grad_()
    F.cross_entropy(a, y).backward()
    assert torch.allclose(z.grad, a.grad, atol=1e-6), "the final output is the target, not pulled toward the heads"
    assert feat.grad.abs().sum() > 0 and sd.heads[0][2].weight.grad is not None


def test_auto_layers_are_blocks_in_fp32_and_leaves_in_an_fx_graph():
    m = _model()
    x = torch.zeros(2, 3, 16, 16)
    assert auto_layers(m, x) == ["layer1", "layer2", "layer3", "layer4"]
    q = prepare(m, x, mode="qat")
    leaves = auto_layers(q, x)
    assert len(leaves) == 4 and all(p.startswith(f"layer{i + 1}.") for i, p in enumerate(leaves))
    with FeatureTaps(q, ["layer1"]) as taps:  # a container FX never calls
        q.eval()(x)
        with pytest.raises(ModelError, match="produced no tensor"):
            taps.get()


# ---------------------------------------------------------------- stage


@pytest.mark.parametrize("kind", ["feature", "attention", "mutual", "self"])
def test_each_kind_trains_the_student_and_keeps_its_masks(tiny_data, kind):
    student = Student(_model())
    pruner = GlobalPruner(student.model, exclude=("@first",))
    student.masks = dict(pruner.update(0.5))
    before = {k: v.clone() for k, v in student.model.state_dict().items()}
    teacher = _model(width=0.25, seed=1) if kind in ("feature", "attention") else None  # wider teacher: adapters
    out = distill_variant(
        student, DistillConfig(kind=kind), teacher=teacher, data=tiny_data, epochs=1, train_config=CFG
    )
    assert out.records["distill"]["kind"] == kind
    assert set(out.model.state_dict()) == set(before), "adapters, heads and peers must not end up in the student"
    assert any(not torch.equal(before[k], v) for k, v in out.model.state_dict().items())
    assert set(out.masks) == set(student.masks)
    for path, mask in out.masks.items():
        assert torch.all(out.model.get_submodule(path).weight.detach()[~mask] == 0)
    assert not any(m._forward_hooks for m in out.model.modules()), "taps are removed"


def test_teacher_kinds_need_a_teacher(tiny_data):
    with pytest.raises(ConfigError, match="needs the dense teacher"):
        distill_variant(
            Student(_model()), DistillConfig(kind="feature"), teacher=None, data=tiny_data, epochs=1, train_config=CFG
        )
    with pytest.raises(ConfigError, match="distill.kind"):
        DistillConfig(kind="contrastive")


@pytest.mark.parametrize("kind", ["feature", "mutual"])
def test_kind_runs_from_a_config(digits_config, tmp_path, kind):
    cfg = RunConfig.from_dict(
        digits_config
        | {"stages": "P:1,Q:1,D:1", "prune": {"sparsity": 0.5, "schedule": "oneshot"}, "distill": {"kind": kind}}
    )
    m = run_pipeline(cfg, tmp_path)
    rec = m["stage_records"][2]["records"]
    assert m["stage_order"] == ["prune", "quantize", "distill"] and rec["kind"] == kind
    if kind == "feature":  # a QAT student: taps on leaves the FX graph calls
        assert len(rec["layers"]) == 4 and all("." in p for p in rec["layers"])
    assert m["sparsity"]["achieved_int8"] >= 0.49
