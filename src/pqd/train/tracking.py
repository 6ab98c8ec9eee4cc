"""Send per-epoch and final metrics to the experiment tracker the user runs.

A :class:`Tracker` has two methods, ``log_metrics(metrics, step=None)`` and ``close()``;
:func:`make_tracker` builds one by name: ``"none"`` (does nothing), ``"tensorboard"`` (event
files under ``path``; needs the ``tensorboard`` package) or ``"mlflow"`` (a run in the local
file store at ``path``; needs the ``mlflow`` package). Only numbers are sent; other values
(strings, lists, nested dicts) are flattened (``a.b``) or skipped.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from pqd.errors import ConfigError

__all__ = ["KINDS", "MLflowTracker", "NullTracker", "TensorBoardTracker", "Tracker", "flatten_metrics", "make_tracker"]

KINDS = ("none", "tensorboard", "mlflow")


class Tracker(Protocol):
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None: ...

    def close(self) -> None: ...


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """``{"a": {"b": 1}, "c": "x", "d": True}`` -> ``{"a.b": 1.0, "d": 1.0}``: numbers only."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten_metrics(v, key + "."))
        elif isinstance(v, (bool, int, float)) and not isinstance(v, complex):
            out[key] = float(v)
        elif hasattr(v, "item") and getattr(v, "numel", lambda: 0)() == 1:  # a one-element tensor
            out[key] = float(v.item())
    return out


class NullTracker:
    """Discards everything (``train.tracker: none``)."""

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker:
    """Scalars in TensorBoard event files under ``path`` (``tensorboard --logdir path``)."""

    def __init__(self, path: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "tracker 'tensorboard' needs the tensorboard package: pip install tensorboard "
                "(or pqd's 'tracking' extra)"
            ) from None
        self.path = Path(path)
        self._writer = SummaryWriter(log_dir=str(self.path))

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        for k, v in flatten_metrics(metrics).items():
            self._writer.add_scalar(k, v, global_step=step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class MLflowTracker:
    """One MLflow run in the local file store at ``path`` (``mlflow ui --backend-store-uri path``)."""

    def __init__(self, path: str | Path, *, run_name: str | None = None):
        try:
            import mlflow
        except ImportError:
            raise ConfigError(
                "tracker 'mlflow' needs the mlflow package, which is not installed: pip install mlflow "
                "(or pqd's 'tracking' extra), or use tracker 'tensorboard'"
            ) from None
        self.path = Path(path).resolve()
        self._mlflow = mlflow
        self._client = mlflow.tracking.MlflowClient(tracking_uri=self.path.as_uri())
        exp = self._client.get_experiment_by_name("pqd")
        exp_id = exp.experiment_id if exp is not None else self._client.create_experiment("pqd")
        self._run_id = self._client.create_run(exp_id, run_name=run_name).info.run_id

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        for k, v in flatten_metrics(metrics).items():
            self._client.log_metric(self._run_id, k, v, step=step or 0)

    def close(self) -> None:
        self._client.set_terminated(self._run_id)


def make_tracker(kind: str, path: str | Path | None = None) -> Tracker:
    """The tracker called ``kind`` (one of :data:`KINDS`), writing under ``path``."""
    if kind not in KINDS:
        raise ConfigError(f"train.tracker: {kind!r} is not one of {', '.join(KINDS)}")
    if kind == "none":
        return NullTracker()
    if path is None:
        raise ConfigError(f"tracker {kind!r} needs a path to write to")
    return TensorBoardTracker(path) if kind == "tensorboard" else MLflowTracker(path)
