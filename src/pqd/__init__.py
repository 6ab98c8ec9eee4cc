"""pqd: Prune -> INT8 Quantize -> Distill for CPU deployment, judged by measurement."""

from pqd.config import (
    DataConfig,
    DistillConfig,
    MeasureConfig,
    ModelConfig,
    PruneConfig,
    QuantizeConfig,
    RunConfig,
    StructuredConfig,
    TeacherConfig,
    TrainConfig,
    load_config,
)
from pqd.errors import CheckpointError, ConfigError, DataError, ModelError, PqdError

__version__ = "0.1.0"

_LAZY = {"create_model": "pqd.registry", "list_models": "pqd.registry", "register_model": "pqd.registry"}


def __getattr__(name: str):
    # torch is imported on first use of the model registry, not by ``import pqd``: a benchmark
    # worker timing an ONNX file (pqd._worker) must not carry torch in its process.
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pqd' has no attribute {name!r}")

__all__ = [
    "CheckpointError", "ConfigError", "DataConfig", "DataError", "DistillConfig", "MeasureConfig", "ModelConfig",
    "ModelError", "PqdError", "PruneConfig", "QuantizeConfig", "RunConfig", "StructuredConfig", "TeacherConfig", "TrainConfig",
    "create_model", "list_models", "load_config", "register_model",
]
