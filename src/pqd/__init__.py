"""pqd: Prune -> INT8 Quantize -> Distill for CPU deployment, judged by measurement."""

from pqd.config import (
    DataConfig, DistillConfig, MeasureConfig, ModelConfig, PruneConfig, QuantizeConfig, RunConfig, TeacherConfig,
    TrainConfig, load_config,
)
from pqd.errors import CheckpointError, ConfigError, DataError, ModelError, PqdError
from pqd.registry import create_model, list_models, register_model

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ConfigError", "DataConfig", "DataError", "DistillConfig", "MeasureConfig", "ModelConfig",
    "ModelError", "PqdError", "PruneConfig", "QuantizeConfig", "RunConfig", "TeacherConfig", "TrainConfig",
    "create_model", "list_models", "load_config", "register_model",
]
