"""Compression stages. Each is a function ``stage(student, config, *, data, epochs, ...)``
that returns a new :class:`Student`; they compose in any order. The pipeline runs them through
the stage registry (:mod:`pqd.stages.registry`): ``register_stage`` adds a new one."""

from pqd.stages.common import Student
from pqd.stages.distill import distill, kd_loss
from pqd.stages.prune import global_sparsity, prunable_layers, prune, sparsity_at
from pqd.stages.quantize import convert, prepare, quantize, to_torchscript
from pqd.stages.registry import Stage, StageContext, get_stage, list_stages, register_stage

__all__ = [
    "Stage", "StageContext", "Student", "convert", "distill", "get_stage", "global_sparsity", "kd_loss", "list_stages",
    "prepare", "prunable_layers", "prune", "quantize", "register_stage", "sparsity_at", "to_torchscript",
]
