"""pqd: Prune -> INT8 Quantize -> Distill for CPU deployment, judged by measurement."""

from pqd.config import DataConfig, MeasureConfig, ModelConfig, TeacherConfig, TrainConfig
from pqd.errors import CheckpointError, ConfigError, DataError, ModelError, PqdError

__version__ = "0.1.0"

_LAZY = {
    "create_model": "pqd.models",
    "list_models": "pqd.models",
    "register_model": "pqd.models",
    "RunConfig": "pqd.run.config",
    "load_config": "pqd.run.config",
    "PruneConfig": "pqd.stages.prune",
    "QuantizeConfig": "pqd.stages.quantize",
    "DistillConfig": "pqd.stages.distill",
    "StructuredConfig": "pqd.stages.structured",
    "ImpConfig": "pqd.stages.imp",
    "JointConfig": "pqd.stages.joint",
    "TuneConfig": "pqd.commands.tune",
    "tune": "pqd.commands.tune",
}


def __getattr__(name: str):
    # torch is imported on first use of the model registry, the run config (which checks stage
    # lists against the stage registry) or a stage's section, not by ``import pqd``: a benchmark worker timing an ONNX
    # file (pqd.measure.worker) must not carry torch in its process.
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pqd' has no attribute {name!r}")


__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataConfig",
    "DataError",
    "DistillConfig",
    "ImpConfig",
    "JointConfig",
    "MeasureConfig",
    "ModelConfig",
    "ModelError",
    "PqdError",
    "PruneConfig",
    "QuantizeConfig",
    "RunConfig",
    "StructuredConfig",
    "TeacherConfig",
    "TrainConfig",
    "TuneConfig",
    "create_model",
    "list_models",
    "load_config",
    "register_model",
    "tune",
]
