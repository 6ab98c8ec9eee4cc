"""Compression stages: the stage protocol (:mod:`pqd.stages.protocol`: ``Stage``, ``StageContext``,
``register_stage``) and one module per stage (``pqd.stages.prune``, ``.quantize``, ``.distill``,
``.structured``, ``.imp``, ``.joint``, ``.distill_variants``), each holding its stage function."""

from pqd.compress.student import Student
from pqd.stages.protocol import Stage, StageContext, get_stage, list_stages, register_stage

__all__ = ["Stage", "StageContext", "Student", "get_stage", "list_stages", "register_stage"]
