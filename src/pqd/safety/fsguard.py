"""Guards for every file pqd writes: never overwrite or mix with a user's files, one process
per output folder, storage failures as clear errors, modes that respect the umask.

Ownership
    A folder pqd creates for output (a run, a sweep, an export or bench folder)
    holds a marker file ``.pqd-run``: JSON with a format tag, the folder's kind (``run``,
    ``sweep``...) and a manifest ``{file name: sha256}`` of the files pqd wrote there through
    :func:`safe_replace` / :func:`atomic_output`. :func:`check_writable_run_dir` accepts a
    folder that does not exist, is empty, or carries the marker of the same kind; anything
    else (a folder holding files but no marker, even files with pqd's names such as a
    user's own ``config.yaml``) is refused with a :class:`pqd.errors.RunDirError` that
    names the files. :func:`safe_replace` replaces an existing file only when the
    manifest says pqd wrote it and its content is unchanged since (or ``overwrite=True``,
    an explicit ``--force``).

Locking
    :class:`DirLock` takes an exclusive ``fcntl.flock`` on ``.pqd-lock`` in the folder and
    writes the holder's pid there; a second process gets :class:`pqd.errors.RunDirBusy`
    ("... is in use by pid N"). The kernel drops the lock when the holder dies (kill -9
    included), so there is never a stale lock to clean. Re-entrant within one process.

Storage errors
    :func:`storage_error` turns ``OSError`` (ENOSPC, EDQUOT, EROFS, EACCES, ELOOP, EIO...),
    safetensors' ``SafetensorError`` ("os error 28"), ``sqlite3.OperationalError``
    ("database or disk is full", "database is locked") and path encoding errors into
    :class:`pqd.errors.StorageError` subclasses whose message names the file and the remedy;
    :func:`storage_errors` is the context-manager form, which also deletes the given
    partial files. Writers here write to a temporary file in the target folder and rename
    it into place, so a failure leaves the previous file (or none), never half of one.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import hashlib
import json
import os
import re
import shutil
import socket
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pqd.errors import (
    DatabaseLockedError,
    DiskFullError,
    PqdError,
    ReadOnlyStorageError,
    RunDirBusy,
    RunDirError,
    StorageError,
)

MARKER = ".pqd-run"
LOCK = ".pqd-lock"
FORMAT = "pqd-output-dir"
VERSION = 1
_ALWAYS_OURS = (MARKER, LOCK, ".*.tmp")  # marker, lock, and temp files of an interrupted atomic write

__all__ = [
    "MARKER",
    "LOCK",
    "file_mode",
    "current_umask",
    "atomic_write_bytes",
    "atomic_output",
    "safe_replace",
    "record_written",
    "commit_file",
    "rescue_write",
    "check_path_encodable",
    "mark_dir",
    "read_marker",
    "check_writable_run_dir",
    "check_replaceable",
    "DirLock",
    "storage_error",
    "storage_errors",
]

# --------------------------------------------------------------------------- modes


_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux >= 4.7)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:  # os.umask can only be read by setting it
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open()`` would give a new file: 0o666 minus the umask (``mkstemp`` uses 0o600)."""
    return 0o666 & ~current_umask()


# --------------------------------------------------------------------------- storage errors

_SAFETENSORS_OS = re.compile(r"os error (\d+)|code: (\d+)")


def _free_bytes(path: Path) -> int | None:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


# where to write instead; not every command has --out (export and bench write into the run folder)
_ELSEWHERE = (
    "write to a folder you can write to instead (run/sweep: another --out; export/bench: copy the run "
    "folder to a writable place first)"
)


def _from_errno(code: int | None, path: Path, action: str, detail: str) -> StorageError | None:
    where = f"{str(path)!r}"
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        free = _free_bytes(path)
        left = f" ({_human(free)} free now)" if free is not None else ""
        return DiskFullError(
            f"no space left on the device while {action} {where}{left}; nothing partial was kept. "
            "Free some space (or write to a folder on another disk) and re-run: finished steps are kept and resume.",
            path=str(path),
        )
    if code == errno.EROFS:
        return ReadOnlyStorageError(
            f"{action} {where} failed: the folder is on a read-only file system; {_ELSEWHERE}", path=str(path)
        )
    if code in (errno.EACCES, errno.EPERM):
        return ReadOnlyStorageError(
            f"permission denied {action} {where}; fix the folder's permissions, or {_ELSEWHERE}", path=str(path)
        )
    if code == errno.ELOOP:
        return StorageError(
            f"{where}: too many levels of symbolic links (a symlink loop); remove the loop", path=str(path)
        )
    if code == errno.ENAMETOOLONG:
        return StorageError(
            f"{where}: the file name is too long for this file system; choose a shorter path", path=str(path)
        )
    if code == errno.EIO:
        return StorageError(
            f"I/O error {action} {where}: the storage may be failing; check the disk and re-run", path=str(path)
        )
    if code is not None:
        name = errno.errorcode.get(code, str(code))
        return StorageError(f"{action} {where} failed: {detail or os.strerror(code)} ({name})", path=str(path))
    return None


def storage_error(
    exc: BaseException, path: str | os.PathLike | None, *, action: str = "writing"
) -> StorageError | None:
    """The :class:`StorageError` that explains ``exc`` (raised while ``action`` ``path``, e.g.
    "writing"/"reading"), or None when ``exc`` is not a storage failure."""
    path = Path(os.fsdecode(path)) if path is not None else Path("?")
    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, OSError):
        return _from_errno(
            exc.errno, Path(os.fsdecode(exc.filename)) if exc.filename else path, action, exc.strerror or ""
        )
    if type(exc).__name__ == "SafetensorError":  # safetensors' Rust io::Error text carries the errno
        m = _SAFETENSORS_OS.search(str(exc))
        if m:
            return _from_errno(int(m.group(1) or m.group(2)), path, action, str(exc))
        return None
    if isinstance(exc, sqlite3.OperationalError):
        msg = str(exc).lower()
        if "database or disk is full" in msg:
            return _from_errno(errno.ENOSPC, path, action, str(exc))
        if "locked" in msg:
            return DatabaseLockedError(
                f"the database {str(path)!r} stayed locked by another process ({exc}); another pqd sweep or a "
                "database browser may hold it. Close it and re-run: finished runs are kept and not recomputed.",
                path=str(path),
            )
        if "readonly" in msg or "read-only" in msg:
            return _from_errno(errno.EROFS, path, action, str(exc))
        if "unable to open" in msg:
            return StorageError(
                f"cannot open the database {str(path)!r} ({exc}); check that its folder exists and is writable",
                path=str(path),
            )
        if "disk i/o error" in msg:
            return _from_errno(errno.EIO, path, action, str(exc))
        return None
    if isinstance(exc, sqlite3.DatabaseError):  # "file is not a database", "database disk image is malformed"
        return StorageError(
            f"{str(path)!r} is not a readable SQLite database ({exc}); move it away to start a new table",
            path=str(path),
        )
    if isinstance(exc, (UnicodeEncodeError, UnicodeDecodeError)) and exc.encoding.replace("-", "").lower() in (
        "utf8",
        "ascii",
    ):
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")
        return StorageError(
            f"the path {shown!r} cannot be encoded ({exc.reason}); use a folder name in UTF-8", path=shown
        )
    return None


@contextmanager
def storage_errors(
    path: str | os.PathLike, *, action: str = "writing", cleanup: Iterable[str | os.PathLike] = ()
) -> Iterator[None]:
    """Convert storage failures inside the block into :class:`StorageError` (see
    :func:`storage_error`), deleting the ``cleanup`` files (partial outputs) first. Other
    exceptions pass through unchanged."""
    try:
        yield
    except PqdError:
        raise
    except Exception as exc:
        err = storage_error(exc, path, action=action)
        if err is None:
            raise
        for p in cleanup:
            with contextlib.suppress(OSError):
                Path(p).unlink(missing_ok=True)
        raise err from exc


def check_path_encodable(path: str | os.PathLike, *, what: str = "--out") -> None:
    """Refuse, before any work, a path that is not valid UTF-8 (bytes a POSIX file system
    accepts but JSON, SQLite and the report cannot store): otherwise the run fails at its
    very end, when the path is written into metrics.json or the results table."""
    raw = os.fsencode(path)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        shown = raw.decode("utf-8", "backslashreplace")
        raise StorageError(
            f"{what} '{shown}' is not a UTF-8 path; pqd records paths in JSON and SQLite, which need "
            "UTF-8. Rename the folder.",
            path=shown,
        ) from None


# --------------------------------------------------------------------------- marker + manifest


def read_marker(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The marker record of ``folder``, or None when it has none (a garbled marker is None too)."""
    p = Path(folder) / MARKER
    try:
        rec = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or rec.get("format") != FORMAT or not isinstance(rec.get("files", {}), dict):
        return None
    rec.setdefault("files", {})
    return rec


def _raw_write(path: Path, data: bytes, on_commit: Callable[[], None] | None = None) -> None:
    """Temp file + fsync + rename with the umask's mode; the temp file is removed on failure.
    ``on_commit`` runs just before the rename (to record the new content as pending)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if on_commit is not None:
            on_commit()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_marker(folder: Path, rec: dict[str, Any]) -> None:
    with storage_errors(folder / MARKER):
        _raw_write(folder / MARKER, json.dumps(rec, indent=1, sort_keys=True).encode())


def mark_dir(folder: str | os.PathLike, *, kind: str) -> dict[str, Any]:
    """Create ``folder`` (parents too) and its marker if it has none."""
    folder = Path(folder)
    with storage_errors(folder, action="creating"):
        folder.mkdir(parents=True, exist_ok=True)
    rec = read_marker(folder)
    if rec is None:
        rec = {
            "format": FORMAT,
            "version": VERSION,
            "kind": kind,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": {},
        }
    _write_marker(folder, rec)
    return rec


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _owned(path: Path, rec: dict[str, Any] | None) -> str:
    """'absent', 'ours' (recorded and unchanged), 'changed' (recorded, edited since) or 'foreign'."""
    if not path.exists() and not path.is_symlink():
        return "absent"
    if rec is None or path.name not in rec["files"] or path.is_symlink() or not path.is_file():
        return "foreign"
    known = rec["files"][path.name]
    return "ours" if _sha256_file(path) in (known if isinstance(known, list) else [known]) else "changed"


def _check_replace(path: Path, overwrite: bool) -> dict[str, Any] | None:
    rec = read_marker(path.parent)
    state = _owned(path, rec)
    if state in ("absent", "ours") or overwrite:
        return rec
    why = "was changed since pqd wrote it" if state == "changed" else "was not written by pqd"
    raise RunDirError(
        f"{str(path)!r} already exists and {why}; pqd never overwrites such a file. "
        "Move it away, or write to another folder (or pass --force where offered to replace it)."
    )


def check_replaceable(paths: Iterable[str | os.PathLike], *, overwrite: bool = False) -> None:
    """Refuse (:class:`RunDirError`) before any work when one of ``paths`` exists and pqd did not
    write it, or it was changed since (the rule of :func:`safe_replace`, checked up front for a
    command that writes several files, so it writes none of them)."""
    for p in paths:
        _check_replace(Path(p), overwrite)


def _record(path: Path, digest: str, rec: dict[str, Any] | None, *, pending: bool = False) -> None:
    """Record ``digest`` as the content pqd wrote at ``path``. ``pending`` (called just before
    the rename) keeps the previous digests too, so that a kill between the rename and the final
    record leaves a manifest that accepts whichever content is on disk."""
    if rec is None:
        return
    rec = read_marker(path.parent) or rec  # re-read: the folder may have been written since
    old = rec["files"].get(path.name, [])
    old = old if isinstance(old, list) else [old]
    rec["files"][path.name] = (old + [digest])[-4:] if pending else [digest]
    _write_marker(path.parent, rec)


def _pending(path: Path, digest: str, rec: dict[str, Any] | None) -> Callable[[], None] | None:
    return (lambda: _record(path, digest, rec, pending=True)) if rec is not None else None


def safe_replace(path: str | os.PathLike, data: bytes, *, overwrite: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically, refusing to replace a file pqd did not write.

    The folder is created if needed. In a marked folder the file is recorded in the
    manifest; in an unmarked one (e.g. ``pqd export --out model.onnx`` into a user's folder)
    only a new file may be written, unless ``overwrite``. Storage failures become
    :class:`StorageError` with no partial file left."""
    path = Path(path)
    with storage_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        rec = _check_replace(path, overwrite)
        digest = hashlib.sha256(data).hexdigest()
        _raw_write(path, data, _pending(path, digest, rec))
    _record(path, digest, rec)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Atomic write with the umask's mode and storage errors converted, *without* the
    ownership check (for files pqd rewrites as a matter of course: checkpoints, files in
    folders it created). In a marked folder the file is still recorded in the manifest, so
    a later :func:`safe_replace` knows pqd wrote it: route every pqd writer through here,
    :func:`safe_replace`, :func:`atomic_output`, :func:`commit_file` or :func:`record_written`."""
    path = Path(path)
    with storage_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        rec = read_marker(path.parent)
        digest = hashlib.sha256(data).hexdigest()
        _raw_write(path, data, _pending(path, digest, rec))
    _record(path, digest, rec)
    return path


@contextmanager
def atomic_output(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """For writers that need a file name (``safetensors.save_file``, ``torch.jit.save``,
    ``torch.onnx.export``, ``sqlite3``): yields a temporary path in the target folder; when
    the block succeeds it is fsynced and renamed to ``path`` (same ownership rule and
    manifest record as :func:`safe_replace`); when it fails it is deleted and a storage
    failure becomes a :class:`StorageError`."""
    path = Path(path)
    with storage_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        rec = _check_replace(path, overwrite)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, file_mode())
        os.close(fd)
    tmp = Path(name)
    try:
        with storage_errors(path, cleanup=[tmp]):
            yield tmp
            commit_file(tmp, path, _rec=rec)
    finally:
        tmp.unlink(missing_ok=True)


def rescue_write(path: str | os.PathLike, data: bytes, *, overwrite: bool = False) -> Path:
    """:func:`safe_replace`, and when storage fails, keep ``data`` anyway: it is written to a
    rescue file in the temp folder (``$TMPDIR``) and the :class:`StorageError` raised names
    it, so hours of measurements (``pqd bench``) are not lost to a full disk at the end."""
    path = Path(path)
    try:
        return safe_replace(path, data, overwrite=overwrite)
    except StorageError as exc:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        try:
            fd, rescue = tempfile.mkstemp(prefix=f"pqd-rescue-{stamp}-", suffix=f"-{path.name}")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        except OSError:
            raise exc from None
        raise type(exc)(
            f"{exc} The data was saved to {rescue}; copy it to {str(path)!r} once there is room.",
            path=exc.path,
            rescue_path=rescue,
        ) from exc


def commit_file(tmp: str | os.PathLike, path: str | os.PathLike, *, _rec: dict[str, Any] | None = None) -> Path:
    """Move a finished temporary file (in the same folder) to ``path``: fsync, the umask's
    mode, then rename, recording it in a marked folder's manifest in a way that survives a
    kill at any point. For writers that make their own temp file (``save_checkpoint``).
    No ownership check: use :func:`atomic_output` where a user's file may be in the way."""
    tmp, path = Path(tmp), Path(path)
    rec = _rec if _rec is not None else read_marker(path.parent)
    with storage_errors(path, cleanup=[tmp]):
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())  # some writers (safetensors) re-create the file 0600
        digest = _sha256_file(tmp) if rec is not None else ""
        if rec is not None:
            _record(path, digest, rec, pending=True)
        os.replace(tmp, path)
    _record(path, digest, rec)
    return path


def record_written(path: str | os.PathLike) -> None:
    """Record a file pqd wrote by other means in its (marked) folder's manifest."""
    path = Path(path)
    rec = read_marker(path.parent)
    if rec is not None:
        _record(path, _sha256_file(path), rec)


# --------------------------------------------------------------------------- folder check


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def check_writable_run_dir(
    path: str | os.PathLike,
    *,
    expected_files: Iterable[str],
    kind: str = "run",
    what: str = "--out",
) -> str:
    """Make sure pqd may write its ``kind`` of output into ``path``, and mark it.

    ``expected_files``: the names (``fnmatch`` patterns, top level only) pqd writes there,
    e.g. ``["config.yaml", "env.json", "metrics.json", "stage*", "*.safetensors"]``.
    Returns how the folder was found: ``"new"``, ``"empty"`` or ``"pqd"`` (marked by pqd).
    Raises :class:`RunDirError` for a file, a folder of another kind, or a folder holding
    files but no marker: without the marker nothing proves pqd wrote them, and a folder
    holding only a user's own ``config.yaml`` looks exactly like a run pqd started.
    """
    folder = Path(path)
    expected = list(expected_files) + list(_ALWAYS_OURS)
    shown = f"{what} {str(folder)!r}"
    with storage_errors(folder, action="reading"):
        if folder.exists() and not folder.is_dir():
            raise RunDirError(f"{shown} is a file, not a directory; choose a directory for the {kind}")

    def mark() -> None:
        try:
            mark_dir(folder, kind=kind)
        except StorageError as exc:
            raise RunDirError(f"{shown} cannot be used as the {kind} directory: {exc}") from None

    if not folder.exists():
        mark()
        return "new"
    with storage_errors(folder, action="reading"):
        rec = read_marker(folder)
        if rec is not None:
            if rec.get("kind") != kind:
                raise RunDirError(
                    f"{shown} holds pqd {rec.get('kind')} output, not {kind} output; choose another folder"
                )
            return "pqd"
        entries = sorted(e.name for e in folder.iterdir())
    if not [e for e in entries if not _matches(e, _ALWAYS_OURS)]:
        mark()
        return "empty"
    foreign = [e for e in entries if not _matches(e, expected)]
    if foreign:
        listed = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise RunDirError(
            f"{shown} already holds files pqd did not write ({listed}); pqd never overwrites or mixes with "
            "them. Choose a new or empty folder."
        )
    listed = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
    raise RunDirError(
        f"{shown} holds {listed} but no {MARKER} marker, so pqd cannot tell that it wrote them; pqd never "
        "overwrites or mixes with files it did not write. Choose a new or empty folder (move your own files "
        "out, e.g. a config.yaml to pass to pqd run)."
    )


# --------------------------------------------------------------------------- lock

_held: dict[str, list] = {}  # resolved lock path -> [fd, count]
_held_lock = threading.Lock()


class DirLock:
    """Exclusive inter-process lock of an output folder (``with DirLock(run_dir): ...``).

    Raises :class:`RunDirBusy` naming the holder's pid when another process holds it.
    Re-entrant in one process (a run that benches inside itself). Where ``flock`` is not
    available (Windows, some network file systems) the lock is a no-op.
    """

    def __init__(self, folder: str | os.PathLike, *, what: str = "RUN_DIR") -> None:
        self.folder = Path(folder)
        self.what = what
        self._key: str | None = None

    def acquire(self) -> DirLock:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return self
        with storage_errors(self.folder, action="creating"):
            self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK
        key = str(path.resolve())
        with _held_lock:
            if key in _held:
                _held[key][1] += 1
                self._key = key
                return self
            with storage_errors(path, action="opening"):
                fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), file_mode())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise RunDirBusy(
                    f"{self.what} {str(self.folder)!r} is in use by {holder}; wait for it to finish (or stop it), "
                    "or use another folder. Two processes writing one folder would mix their results."
                ) from None
            except OSError as exc:
                if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    os.close(fd)
                    return self
                os.close(fd)
                err = storage_error(exc, path, action="locking")
                if err is None:
                    raise
                raise err from exc
            info = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "argv": sys.argv[:6],
            }
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(info).encode(), 0)
            except OSError:
                pass  # the lock holds whether or not the note could be written
            _held[key] = [fd, 1]
            self._key = key
        return self

    def release(self) -> None:
        if self._key is None:
            return
        with _held_lock:
            entry = _held.get(self._key)
            if entry is not None:
                entry[1] -= 1
                if entry[1] == 0:
                    import fcntl

                    del _held[self._key]
                    try:
                        fcntl.flock(entry[0], fcntl.LOCK_UN)
                    finally:
                        os.close(entry[0])
        self._key = None

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        pid = info.get("pid")
        host = info.get("host")
        where = f" on {host}" if host and host != socket.gethostname() else ""
        cmd = " ".join(info.get("argv") or [])
        since = f" since {info['since']}" if info.get("since") else ""
        return f"pid {pid}{where}{since}" + (f" ({cmd})" if cmd else "") if pid else "another process"
    except (OSError, ValueError, AttributeError):
        return "another process"
