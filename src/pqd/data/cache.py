"""On-disk cache of decoded arrays (``.npy``), keyed by the source's path, size and mtime."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pqd.data.base import Raw, log

FORMAT_VERSION = 1
_ARRAYS = ("x_train", "y_train", "x_test", "y_test")


def cache_root(cache_dir: str | None = None) -> Path:
    """``cache_dir``, else ``$PQD_CACHE``, else ``~/.cache/pqd``."""
    return Path(cache_dir or os.environ.get("PQD_CACHE") or "~/.cache/pqd").expanduser()


def source_key(kind: str, source: Path) -> str:
    """Hash of (format version, kind, absolute path, size and mtime of the file or of every file in the dir)."""
    source = source.resolve()
    h = hashlib.sha256(f"{FORMAT_VERSION}\0{kind}\0{source}\0".encode())
    if source.is_dir():
        for dirpath, dirnames, filenames in os.walk(source):
            dirnames.sort()
            for name in sorted(filenames):
                p = os.path.join(dirpath, name)
                st = os.stat(p)
                h.update(f"{os.path.relpath(p, source)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    else:
        st = source.stat()
        h.update(f"{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def cached(root: Path, kind: str, source: Path, decode: Callable[[], Raw]) -> Raw:
    """Return the cached arrays for ``source`` or run ``decode`` and store its result."""
    entry = root / "decoded" / f"{kind}-{source_key(kind, source)}"
    raw = _load(entry)
    if raw is not None:
        log.debug("cache hit: %s -> %s", source, entry)
        return raw
    log.info("decoding %s (first use; caching in %s)", source, entry)
    t0 = time.perf_counter()
    raw = decode()
    log.info("decoded %d train + %d test images in %.1fs", len(raw.y_train), len(raw.y_test), time.perf_counter() - t0)
    try:
        _save(entry, raw)
    except OSError as exc:
        log.warning(
            "could not write the data cache %s (%s); set data.cache_dir or PQD_CACHE to a writable folder", entry, exc
        )
    return raw


def _load(entry: Path) -> Raw | None:
    meta = entry / "classes.json"
    if not meta.is_file():
        return None
    try:
        classes = tuple(json.loads(meta.read_text())["classes"])
        arrays = [np.load(entry / f"{name}.npy", allow_pickle=False) for name in _ARRAYS]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring a damaged cache entry %s (%s); decoding again", entry, exc)
        return None
    return Raw(arrays[0], arrays[1], arrays[2], arrays[3], classes)


def _save(entry: Path, raw: Raw) -> None:
    """Write into a temp dir next to ``entry`` and rename it into place (atomic on POSIX)."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=".tmp-"))
    try:
        for name, arr in zip(_ARRAYS, raw[:4], strict=True):
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(arr), allow_pickle=False)
        (tmp / "classes.json").write_text(json.dumps({"classes": list(raw.classes), "format": FORMAT_VERSION}))
        if entry.exists():  # a damaged entry that _load rejected
            shutil.rmtree(entry)
        try:
            os.replace(tmp, entry)
        except OSError:
            if not (entry / "classes.json").is_file():
                raise
            log.debug("cache entry %s was written concurrently; keeping that one", entry)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
