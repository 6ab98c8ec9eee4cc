"""Compression stages. Each is a function ``stage(student, config, *, data, epochs, ...)``
that returns a new :class:`Student`; they compose in any order."""

from pqd.stages.common import Student
from pqd.stages.distill import distill, kd_loss
from pqd.stages.prune import global_sparsity, prunable_layers, prune, sparsity_at
from pqd.stages.quantize import convert, prepare, quantize, to_torchscript

__all__ = [
    "Student", "convert", "distill", "global_sparsity", "kd_loss", "prepare", "prunable_layers",
    "prune", "quantize", "sparsity_at", "to_torchscript",
]
