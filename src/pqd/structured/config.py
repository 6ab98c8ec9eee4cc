"""The ``structured`` section of a run config lives in :mod:`pqd.config` with the other sections."""

from pqd.config import STRUCTURED_CRITERIA as CRITERIA, STRUCTURED_RUNTIMES as RUNTIMES, StructuredConfig

__all__ = ["CRITERIA", "RUNTIMES", "StructuredConfig"]
