import sys

import pytest

from pqd.errors import ConfigError
from pqd.train.tracking import NullTracker, flatten_metrics, make_tracker


def test_flatten_keeps_numbers_only():
    assert flatten_metrics({"a": {"b": 1, "c": "x"}, "d": True, "e": [1, 2], "f": 0.5}) == {
        "a.b": 1.0,
        "d": 1.0,
        "f": 0.5,
    }


def test_tensorboard_tracker_writes_scalars(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard package is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    t = make_tracker("tensorboard", tmp_path / "tb")
    for epoch in range(3):
        t.log_metrics({"prune": {"loss": 1.0 / (epoch + 1)}}, step=epoch)
    t.log_metrics({"student_top1": 0.9, "stages": "P:1"})
    t.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"prune.loss", "student_top1"}
    assert [e.step for e in acc.Scalars("prune.loss")] == [0, 1, 2]
    assert acc.Scalars("prune.loss")[-1].value == pytest.approx(1 / 3)


def test_unknown_or_missing_trackers_say_what_to_do(tmp_path, monkeypatch):
    assert isinstance(make_tracker("none"), NullTracker)
    with pytest.raises(ConfigError, match="not one of none, tensorboard, mlflow"):
        make_tracker("wandb", tmp_path)
    monkeypatch.setitem(sys.modules, "mlflow", None)  # make `import mlflow` fail even where it is installed
    with pytest.raises(ConfigError, match="pip install mlflow"):
        make_tracker("mlflow", tmp_path)
