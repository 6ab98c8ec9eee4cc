"""Every stage keeps the student on the device it was given.

CI has no GPU, so two CPU-only checks stand in for one:
* a model on the 'meta' device (tensors without data): any hidden ``.cpu()`` copy of it fails,
  and every returned tensor must still be on 'meta';
* on the CPU, hard-coded moves (``nn.Module.cpu()``, ``nn.Module.to("cpu")`` with the literal
  string) are recorded while the stages train: a stage that moves the live model (or a copy it
  trains) to the CPU is caught even though the move is a no-op here. Moves to a
  ``torch.device`` read off the model itself are legitimate and not recorded.
Both fail on 12249db, whose ``prepare`` did ``copy.deepcopy(model).cpu()`` and whose
``quantize`` trained that CPU copy.
"""

import pytest
import torch
from torch import nn

from pqd.compress.qat import prepare
from pqd.compress.student import Student
from pqd.config import TrainConfig
from pqd.models.registry import create_model
from pqd.stages.distill import DistillConfig, distill
from pqd.stages.prune import PruneConfig, prune
from pqd.stages.quantize import QuantizeConfig, quantize

CFG = TrainConfig(batch_size=32, progress=False, channels_last=False)


def _devices(model: nn.Module) -> set[str]:
    return {t.device.type for t in list(model.parameters()) + list(model.buffers())}


def _model(device="cpu"):
    torch.manual_seed(0)
    m = create_model("resnet18", num_classes=4, width=0.125)
    return m if device == "cpu" else m.to(device)


@pytest.mark.parametrize("mode", ["qat", "ptq"])
def test_prepare_keeps_the_device(mode):
    m = _model("meta")
    q = prepare(m, torch.zeros(2, 3, 16, 16), mode=mode)
    assert _devices(q) == {"meta"}, "prepare moved (part of) the model off its device"
    assert _devices(m) == {"meta"}


def test_stages_keep_a_meta_student_on_meta(tiny_data):
    teacher = _model("meta")
    s = prune(
        Student(_model("meta")),
        PruneConfig(sparsity=0.5, schedule="oneshot"),
        data=tiny_data,
        epochs=0,
        train_config=CFG,
    )
    assert _devices(s.model) == {"meta"} and {m.device.type for m in s.masks.values()} == {"meta"}
    q = quantize(s, QuantizeConfig(mode="qat"), data=tiny_data, epochs=0, train_config=CFG)
    assert q.form == "qat" and _devices(q.model) == {"meta"}
    d = distill(q, DistillConfig(), teacher=teacher, data=tiny_data, epochs=0, train_config=CFG)
    assert _devices(d.model) == {"meta"}


@pytest.fixture()
def cpu_moves(monkeypatch):
    """Record every ``Module.cpu()`` and ``Module.to("cpu")`` call."""
    calls = []
    real_cpu, real_to = nn.Module.cpu, nn.Module.to

    def cpu(self, *a, **k):
        calls.append(f"{type(self).__name__}.cpu()")
        return real_cpu(self, *a, **k)

    def to(self, *a, **k):
        target = k.get("device", a[0] if a else None)
        if isinstance(target, str) and torch.device(target).type == "cpu":
            calls.append(f"{type(self).__name__}.to({target!s})")
        return real_to(self, *a, **k)

    monkeypatch.setattr(nn.Module, "cpu", cpu)
    monkeypatch.setattr(nn.Module, "to", to)
    return calls


def test_training_stages_never_move_the_model_to_cpu(tiny_data, cpu_moves):
    teacher = _model()
    s = Student(_model())
    s = prune(s, PruneConfig(sparsity=0.5), data=tiny_data, epochs=1, train_config=CFG)
    s = quantize(s, QuantizeConfig(mode="qat"), data=tiny_data, epochs=1, train_config=CFG)
    s = distill(s, DistillConfig(), teacher=teacher, data=tiny_data, epochs=1, train_config=CFG)
    assert cpu_moves == [], f"a stage moved a model to the CPU: {cpu_moves}"
    assert s.form == "qat"
