"""The stage protocol: every stage reports to the run's tracker; a stage with its own options is
one module plus one registration."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import pqd.structured.latency_model as L
import pqd.structured.search as S
from pqd.compress.student import Student
from pqd.config import Section, TrainConfig, in_range
from pqd.errors import ConfigError
from pqd.run.config import RunConfig
from pqd.stages import Stage, StageContext, get_stage, register_stage
from pqd.stages.protocol import unregister_stage


class Recorder:
    def __init__(self):
        self.calls = []

    def log_metrics(self, metrics, step=None):
        self.calls.append((step, dict(metrics)))

    def close(self):
        pass


class Convs(nn.Module):
    """Two conv blocks and a classifier: small enough for the structured stage's search in a unit test."""

    def __init__(self, num_classes: int = 4):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))


CASES = {  # stage -> run config overrides
    "prune": {"prune": {"sparsity": 0.5}},
    "quantize": {},
    "distill": {},
    "imp": {"imp": {"rounds": 1}},
    "joint": {"joint": {"sparsity": 0.5}},
    "structured": {
        "structured": {
            "budget_fraction": 0.9,
            "runtime": "pytorch",
            "threads": 1,
            "samples": 3,
            "runs": 10,
            "max_iters": 2,
        }
    },
    **{
        f"distill-{kind}": {"distill": {"kind": kind, "layers": ["features.2", "features.5"]}}
        for kind in ("feature", "attention", "mutual", "self")
    },
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_stage_logs_to_the_run_tracker(case, tiny_data, tmp_path, monkeypatch):
    name = case.split("-")[0]
    stage = get_stage(name)
    overrides = dict(CASES[case])
    if name == "structured":
        overrides["structured"] = overrides["structured"] | {"cache_dir": str(tmp_path)}
        real = L.measure_int8
        in_process = lambda *a, **k: real(*a, **{**k, "in_process": True})  # noqa: E731  (no worker processes in a unit test)
        monkeypatch.setattr(L, "measure_int8", in_process)
        monkeypatch.setattr(S, "measure_int8", in_process)
    torch.manual_seed(0)
    model = Convs()
    epochs = 2 if name == "imp" else 1  # imp: one training segment before and one after its round
    config = RunConfig.from_dict({"stages": f"{stage.letter}:{epochs}", **overrides})
    tracker = Recorder()
    ctx = StageContext(
        data=tiny_data,
        teacher=copy.deepcopy(model).eval(),
        config=config,
        train_config=TrainConfig(batch_size=64, progress=False, channels_last=False),
        seed=0,
        augment=False,
        device=torch.device("cpu"),
        tracker=tracker,
    )
    stage.run(Student(model), config.section(stage.section), ctx, epochs=epochs, checkpoint=None)
    assert tracker.calls, f"stage {case} logged nothing to the tracker"
    assert all(any(k.endswith(".loss") for k in metrics) for _, metrics in tracker.calls)


@dataclass(frozen=True)
class DoubleConfig(Section):
    """Options of the test-only 'double' stage."""

    factor: float = 2.0

    def __post_init__(self):
        in_range("double.factor", self.factor, 1.0, 10.0)


class DoubleStage(Stage):
    """A test-only stage with its own section: scales the student's weights by ``factor``."""

    name, letter, section, config_class = "double", "X", "double", DoubleConfig

    def run(self, student, section_config, ctx, *, epochs, checkpoint):
        with torch.no_grad():
            for p in student.model.parameters():
                p.mul_(section_config.factor)
        student.records[f"{ctx.index + 1}_{self.name}"] = {"factor": section_config.factor}
        return student


@pytest.fixture()
def double_stage():
    register_stage(DoubleStage())
    yield
    unregister_stage("double")


def test_a_stage_with_options_is_one_registration(double_stage, capsys):
    from pqd.cli import main

    cfg = RunConfig.from_dict({"stages": "X:0,Q:1", "double": {"factor": 3}})
    assert cfg.double == DoubleConfig(factor=3.0) and cfg.stage_string() == "X:0,Q:1"
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="double.factor"):
        RunConfig.from_dict({"double": {"factor": 20}})
    with pytest.raises(ConfigError, match="Did you mean 'double.factor'"):
        RunConfig.from_dict({"double": {"factr": 3}})
    assert main(["config", "--set", "double.factor=4"]) == 0
    assert "double:\n  factor: 4.0\n" in capsys.readouterr().out
    ctx = StageContext(
        data=None,
        teacher=None,
        config=cfg,
        train_config=TrainConfig(),
        seed=0,
        augment=False,
        device=torch.device("cpu"),
        index=0,
    )
    student = get_stage("X").run(Student(nn.Linear(2, 2, bias=False)), cfg.double, ctx, epochs=0, checkpoint=None)
    assert student.records == {"1_double": {"factor": 3.0}}


def test_a_section_without_its_stage_is_unknown():
    with pytest.raises(ConfigError, match="unknown key"):
        RunConfig.from_dict({"double": {"factor": 3}})
