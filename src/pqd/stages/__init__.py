"""Compression stages: the stage protocol (:mod:`pqd.stages.protocol`: ``Stage``, ``StageContext``,
``register_stage``) and one module per stage, each holding its config section, validation, stage
function and registration. Importing this package registers the built-in stages, one line each."""

from pqd.compress.student import Student
from pqd.stages.protocol import Stage, StageContext, get_stage, list_stages, register_stage

# isort: off
# one line per built-in stage, in the order `pqd config` and stage-list errors list them
from pqd.stages import prune  # noqa: E402,F401
from pqd.stages import quantize  # noqa: E402,F401
from pqd.stages import distill  # noqa: E402,F401
from pqd.stages import structured  # noqa: E402,F401
from pqd.stages import imp  # noqa: E402,F401
from pqd.stages import joint  # noqa: E402,F401

# isort: on
__all__ = ["Stage", "StageContext", "Student", "get_stage", "list_stages", "register_stage"]
