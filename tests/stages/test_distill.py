import copy

import pytest
import torch
import torch.nn.functional as F

from pqd.compress.kd import kd_loss
from pqd.compress.student import Student
from pqd.config import TrainConfig
from pqd.measure import agreement, predict
from pqd.models.registry import create_model
from pqd.stages.distill import DistillConfig, distill
from pqd.train import train

CFG = TrainConfig(batch_size=32, progress=False)


def test_kd_loss_formula():
    s, t, y = torch.randn(8, 5), torch.randn(8, 5), torch.randint(0, 5, (8,))
    T, a = 3.0, 0.7
    p_t = F.softmax(t / T, 1)
    kl = (p_t * (p_t.log() - F.log_softmax(s / T, 1))).sum(1).mean()
    assert kd_loss(s, t, y, temperature=T, alpha=a).item() == pytest.approx(
        (T * T * kl + a * F.cross_entropy(s, y)).item(), rel=1e-5
    )
    assert kd_loss(t, t, y, temperature=T, alpha=0.0).item() == pytest.approx(0.0, abs=1e-6)


def test_distill_moves_student_towards_teacher(tiny_data):
    torch.manual_seed(0)
    teacher = train(create_model("resnet18", num_classes=4, width=0.125), tiny_data, epochs=3, lr=0.05, config=CFG)
    torch.manual_seed(1)
    student = create_model("resnet18", num_classes=4, width=0.125)
    t_logits = predict(teacher, tiny_data.test, mean=tiny_data.mean, std=tiny_data.std)
    before = agreement(predict(student, tiny_data.test, mean=tiny_data.mean, std=tiny_data.std), t_logits)
    teacher_state = copy.deepcopy(teacher.state_dict())
    out = distill(
        Student(student), DistillConfig(alpha=0.0, lr=0.05), teacher=teacher, data=tiny_data, epochs=3, train_config=CFG
    )
    after = agreement(predict(out.model, tiny_data.test, mean=tiny_data.mean, std=tiny_data.std), t_logits)
    assert after > max(before, 0.6)
    assert all(torch.equal(teacher_state[k], v) for k, v in teacher.state_dict().items()), "teacher must stay frozen"


def test_kd_weight_scales_the_teacher_term_and_zero_is_ce_only():
    s, t, y = torch.randn(8, 5), torch.randn(8, 5), torch.randint(0, 5, (8,))
    T, a = 3.0, 0.7
    full = kd_loss(s, t, y, temperature=T, alpha=a)
    ce = a * F.cross_entropy(s, y)
    half = kd_loss(s, t, y, temperature=T, alpha=a, kd_weight=0.5)
    assert half.item() == pytest.approx((ce + 0.5 * (full - ce)).item(), rel=1e-5)
    assert kd_loss(s, None, y, temperature=T, alpha=a, kd_weight=0.0).item() == pytest.approx(ce.item(), rel=1e-6)


def test_kd_weight_zero_with_alpha_zero_is_rejected():
    from pqd.errors import ConfigError

    with pytest.raises(ConfigError, match="kd_weight"):
        DistillConfig(kd_weight=0.0, alpha=0.0)
    with pytest.raises(ConfigError, match="kd_weight"):
        DistillConfig(kd_weight=-1.0)
    assert DistillConfig().kd_weight == 1.0


def test_kd_off_never_runs_the_teacher(tiny_data):
    class Exploding(torch.nn.Module):
        def forward(self, x):
            raise AssertionError("the teacher must not run when kd_weight is 0")

    torch.manual_seed(0)
    student = create_model("resnet18", num_classes=4, width=0.125)
    before = copy.deepcopy(student.state_dict())
    out = distill(
        Student(student),
        DistillConfig(kd_weight=0.0, alpha=1.0, lr=0.05),
        teacher=Exploding(),
        data=tiny_data,
        epochs=1,
        train_config=CFG,
    )
    assert any(not torch.equal(before[k], v) for k, v in out.model.state_dict().items()), (
        "the student still trains (CE)"
    )


class _Recording(torch.nn.Module):
    """A teacher that records the device of the images it is given."""

    def __init__(self, device: str = "cpu"):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3, device=device)
        self.seen: list[torch.device] = []

    def forward(self, x):
        self.seen.append(x.device)
        return self.fc(x)


def test_teacher_logits_run_on_the_teachers_device_without_gradients():
    from pqd.compress.kd import teacher_logits

    teacher = _Recording("meta")  # a device other than the images' (CPU)
    out = teacher_logits(teacher, torch.randn(2, 4))
    assert teacher.seen == [torch.device("meta")] and not out.requires_grad


def test_distillation_loss_honours_kd_weight_and_skips_the_teacher_when_it_is_zero():
    from pqd.compress.kd import KDLoss, distillation_loss

    teacher, s, x, y = _Recording(), torch.randn(5, 3), torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    off = distillation_loss(KDLoss(alpha=0.5, kd_weight=0.0), teacher)(s, x, y)
    assert teacher.seen == [] and off.item() == pytest.approx(0.5 * F.cross_entropy(s, y).item(), rel=1e-6)
    t = teacher(x).detach()
    half = distillation_loss(KDLoss(temperature=2.0, alpha=0.5, kd_weight=0.5), teacher)(s, x, y)
    assert half.item() == pytest.approx(kd_loss(s, t, y, temperature=2.0, alpha=0.5, kd_weight=0.5).item(), rel=1e-5)
    assert not teacher.training


def test_a_collapse_after_the_freeze_boundary_is_recorded_and_a_safe_rate_is_not(tiny_data):
    """The D stage measures a held-out batch when observers and BN statistics freeze and at its end: a
    learning rate too high for frozen BN statistics is recorded (for metrics.json) with what to do; an
    unchanged model is not."""
    from dataclasses import replace

    from pqd.stages.quantize import QuantizeConfig, quantize

    data = replace(tiny_data, val=tiny_data.test)
    cfg = TrainConfig(batch_size=32, progress=False)
    torch.manual_seed(0)
    teacher = create_model("resnet18", num_classes=4, width=0.125)
    train(teacher, data, epochs=2, lr=0.05, config=cfg)
    records = {}
    for lr in (0.5, 1e-9):  # far too high for frozen BN statistics / no change at all
        student = Student(copy.deepcopy(teacher))
        student = quantize(student, QuantizeConfig(freeze_fraction=0.0), data=data, epochs=1, train_config=cfg)
        student.freeze_fraction = 1.0  # frozen from the first distill epoch
        records[lr] = distill(
            student, DistillConfig(lr=lr), teacher=teacher, data=data, epochs=2, train_config=cfg
        ).records
    (warning,) = records[0.5]["distill"]["warnings"]
    assert "collapsed the model" in warning and "lower distill.lr" in warning
    assert "distill" not in records[1e-9]  # the measurement itself raises no false alarm
