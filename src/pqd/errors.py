"""pqd's typed errors. Every error a user can cause is a subclass of :class:`PqdError`
and its message says what was wrong and how to fix it."""


class PqdError(Exception):
    """Base class of every error pqd raises on purpose."""


class ConfigError(PqdError, ValueError):
    """A configuration key or value is invalid."""


class DataError(PqdError):
    """A dataset cannot be found, read or matched to the model."""


class ModelError(PqdError):
    """A model cannot be built, or cannot be handled by a stage (``detail``: the whole report
    of the tool that failed, e.g. the ONNX exporter's, when the message shows only its gist)."""

    detail: str | None = None


class CheckpointError(PqdError):
    """A checkpoint is missing, corrupt, or unsafe to load."""


class RunDirError(PqdError):
    """An output folder cannot be used: it holds files pqd did not write, or another
    pqd process is using it."""


class RunDirBusy(RunDirError):
    """Another process holds the lock of a run or sweep folder."""


class StorageError(PqdError):
    """A file could not be written or read because of the storage: disk full, read-only
    file system, missing permission, locked or full database, unencodable path.
    ``path`` is the file concerned (or None); ``rescue_path`` the temp file that holds the
    data which could not be written there (or None)."""

    def __init__(self, message: str, *, path: str | None = None, rescue_path: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.rescue_path = rescue_path


class DiskFullError(StorageError):
    """No space left on the device (or quota exceeded) while writing a file."""


class ReadOnlyStorageError(StorageError):
    """The target folder is on a read-only file system or not writable by this user."""


class DatabaseLockedError(StorageError):
    """An SQLite database stayed locked by another process past the timeout."""


class DivergenceError(PqdError):
    """Training produced a non-finite loss or non-finite weights, or a model is no better
    than chance."""


class RuntimeCrash(PqdError):
    """A function run in its own process (a runtime's export check, a benchmark worker)
    died natively (segfault, abort), timed out, or raised: its exit code, the signal's name
    that killed it (or None), whether it timed out, and its whole stderr."""

    def __init__(
        self,
        message: str,
        *,
        returncode: int | None = None,
        signal: str | None = None,
        timed_out: bool = False,
        stderr: str = "",
    ) -> None:
        super().__init__(message)
        self.returncode, self.signal, self.timed_out, self.stderr = returncode, signal, timed_out, stderr


class UntrustedCodeError(ModelError):
    """Rebuilding a model would import code named by a file on disk, and the caller did
    not allow it."""


class CollapseWarning(UserWarning):
    """Training after freezing observers and BN statistics made a model much worse on held-out
    data (see :class:`pqd.compress.qat.FreezeCheck`)."""


class FrozenBranchWarning(UserWarning):
    """Tracing for TorchScript froze data-dependent Python control flow: the saved model always
    takes the branch the example input took."""
