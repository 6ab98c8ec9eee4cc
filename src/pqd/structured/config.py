"""The ``structured`` section of a run config lives in :mod:`pqd.config` with the other sections."""

from pqd.config import STRUCTURED_CRITERIA as CRITERIA
from pqd.config import STRUCTURED_RUNTIMES as RUNTIMES
from pqd.config import StructuredConfig

__all__ = ["CRITERIA", "RUNTIMES", "StructuredConfig"]
