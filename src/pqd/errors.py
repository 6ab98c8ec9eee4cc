"""pqd's typed errors. Every error a user can cause is a subclass of :class:`PqdError`
and its message says what was wrong and how to fix it."""


class PqdError(Exception):
    """Base class of every error pqd raises on purpose."""


class ConfigError(PqdError, ValueError):
    """A configuration key or value is invalid."""


class DataError(PqdError):
    """A dataset cannot be found, read or matched to the model."""


class ModelError(PqdError):
    """A model cannot be built, or cannot be handled by a stage."""


class CheckpointError(PqdError):
    """A checkpoint is missing, corrupt, or unsafe to load."""
