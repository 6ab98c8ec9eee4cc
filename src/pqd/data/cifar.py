"""CIFAR-10/100: find the data (standard python archive, its extracted folder, or a JPEG image-folder copy),
download it on request, and read the pickled batches with a restricted unpickler."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tempfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from pqd.data.base import Raw, log
from pqd.data.folder import is_archive, iter_tar, read_image_folder
from pqd.errors import DataError


@dataclass(frozen=True)
class CifarSpec:
    name: str
    title: str
    archive: str  # standard python archive
    folder: str  # the folder inside it
    jpeg: str  # image-folder copy, as named in the shared data folder
    url: str
    md5: str
    num_classes: int
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str

    @property
    def files(self) -> tuple[str, ...]:
        return (*self.train_files, *self.test_files, self.meta_file)


SPECS = {
    "cifar10": CifarSpec(
        "cifar10",
        "CIFAR-10",
        "cifar-10-python.tar.gz",
        "cifar-10-batches-py",
        "cifar10-jpeg.tar.gz",
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
        10,
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        "batches.meta",
        "labels",
        "label_names",
    ),
    "cifar100": CifarSpec(
        "cifar100",
        "CIFAR-100",
        "cifar-100-python.tar.gz",
        "cifar-100-python",
        "cifar100-jpeg.tar.gz",
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85",
        100,
        ("train",),
        ("test",),
        "meta",
        "fine_labels",
        "fine_label_names",
    ),
}
_PYTHON_FILES = {f for s in SPECS.values() for f in s.files}
_PYTHON_FOLDERS = {s.folder for s in SPECS.values()}


def _numpy_core(module: str, name: str) -> Callable[[], Any]:
    def get() -> Any:
        import importlib

        try:
            return getattr(importlib.import_module(f"numpy._core.{module}"), name)  # numpy >= 2
        except ImportError:
            return getattr(importlib.import_module(f"numpy.core.{module}"), name)

    return get


# The only globals a CIFAR batch pickle references: numpy array reconstruction. dict/list/bytes/int
# are pickle opcodes, not globals, so no builtins are needed at all.
_ALLOWED: dict[tuple[str, str], Callable[[], Any]] = {
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    **{
        (f"numpy.{core}.multiarray", n): _numpy_core("multiarray", n)
        for core in ("core", "_core")
        for n in ("_reconstruct", "scalar")
    },
    **{(f"numpy.{core}.numeric", "_frombuffer"): _numpy_core("numeric", "_frombuffer") for core in ("core", "_core")},
}


class ForbiddenGlobal(pickle.UnpicklingError):
    """A pickle referenced a global outside the allow-list."""


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the numpy globals CIFAR batches need; anything else is refused."""

    def find_class(self, module: str, name: str) -> Any:
        get = _ALLOWED.get((module, name))
        if get is None:
            raise ForbiddenGlobal(f"global '{module}.{name}' is forbidden")
        return get()


def restricted_loads(data: bytes, where: str) -> Any:
    """Unpickle a CIFAR batch safely; ``DataError`` for forbidden globals or a damaged file."""
    try:
        return RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except ForbiddenGlobal as exc:
        raise DataError(
            f"refusing to load {where}: {exc}; it is not a genuine CIFAR batch. Delete it and use the official archive"
        ) from None
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        MemoryError,
    ) as exc:
        raise DataError(
            f"{where} is not a readable CIFAR batch ({type(exc).__name__}: {exc}); download the archive again"
        ) from None


def _batch(blob: bytes, where: str) -> dict[str, Any]:
    obj = restricted_loads(blob, where)
    if not isinstance(obj, dict):
        raise DataError(f"{where} holds a {type(obj).__name__}, not a CIFAR batch dict; download the archive again")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def read_python(spec: CifarSpec, path: Path) -> Raw:
    """Read the standard python version (archive or extracted folder) into uint8 NCHW arrays."""
    blobs: dict[str, bytes] = {}
    if path.is_dir():
        base = path / spec.folder if (path / spec.folder).is_dir() else path
        for f in spec.files:
            if (base / f).is_file():
                blobs[f] = (base / f).read_bytes()
    else:
        for name, _, data in iter_tar(path, lambda n: PurePosixPath(n).name in spec.files):
            if data is not None:
                blobs[PurePosixPath(name).name] = data
    missing = [f for f in spec.files if f not in blobs]
    if missing:
        raise DataError(
            f"{path} lacks {', '.join(missing)}, so it is not the {spec.title} python version "
            f"({spec.archive} holding {spec.folder}/); point data.root at the right archive or folder"
        )
    meta = _batch(blobs[spec.meta_file], f"{path}:{spec.meta_file}")
    names = meta.get(spec.names_key)
    if not isinstance(names, list) or len(names) != spec.num_classes:
        raise DataError(
            f"{path}:{spec.meta_file} has no list of {spec.num_classes} '{spec.names_key}'; download the archive again"
        )
    classes = tuple(n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names)

    def split(files: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for f in files:
            where = f"{path}:{f}"
            b = _batch(blobs.pop(f), where)
            x, y = b.get("data"), b.get(spec.label_key)
            if not (isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 2 and x.shape[1] == 3072):
                raise DataError(f"{where}: 'data' is not a uint8 [N, 3072] array; download the archive again")
            y = np.asarray(y, dtype=np.int64)
            if y.shape != (len(x),) or (len(y) and (y.min() < 0 or y.max() >= spec.num_classes)):
                raise DataError(
                    f"{where}: '{spec.label_key}' does not hold {len(x)} labels in [0, {spec.num_classes}); download the archive again"
                )
            xs.append(x.reshape(-1, 3, 32, 32))
            ys.append(y)
        return np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys)

    return Raw(*split(spec.train_files), *split(spec.test_files), classes)


def _is_python_archive(path: Path) -> bool:
    """Whether a tar holds the python batches (judged by its first file) rather than an image folder."""
    for name, is_dir, _ in iter_tar(path, lambda n: False):
        if not is_dir:
            p = PurePosixPath(name)
            return p.name in _PYTHON_FILES or p.parent.name in _PYTHON_FOLDERS
    return False


def find_source(spec: CifarSpec, where: Path) -> tuple[str, Path] | None:
    """``("python" | "folder", path)`` for the first CIFAR copy found at ``where`` (file or dir)."""
    if where.is_file():
        if not is_archive(where):
            raise DataError(
                f"data.root {where} is a file but not a tar/.tar.gz archive; point it at {spec.archive}, {spec.jpeg} or a folder"
            )
        return ("python" if _is_python_archive(where) else "folder", where)
    if not where.is_dir():
        return None
    if (where / spec.folder).is_dir() or (where / spec.meta_file).is_file():
        return "python", where
    if (where / spec.archive).is_file():
        return "python", where / spec.archive
    if (where / "train").is_dir() or (where / "test").is_dir():
        return "folder", where
    if is_archive(where / spec.jpeg):
        return "folder", where / spec.jpeg
    return None


def download(spec: CifarSpec, dest: Path) -> Path:
    """Fetch the official archive into ``dest`` via a temp file, check its md5, rename it into place."""
    dest.mkdir(parents=True, exist_ok=True)
    final = dest / spec.archive
    fix = f"set data.root to a folder or archive with the data (e.g. --set data.root=../shared/data/{spec.jpeg})"
    fd, tmp = tempfile.mkstemp(dir=dest, prefix=f".{spec.archive}.", suffix=".part")
    log.info("downloading %s to %s", spec.url, final)
    try:
        md5 = hashlib.md5(usedforsecurity=False)
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(spec.url, timeout=60) as resp:
            while chunk := resp.read(1 << 20):
                md5.update(chunk)
                out.write(chunk)
        if md5.hexdigest() != spec.md5:
            raise DataError(
                f"downloaded {spec.url} has md5 {md5.hexdigest()}, expected {spec.md5} (corrupt or truncated download); "
                f"try again, or {fix}"
            )
        os.replace(tmp, final)
    except OSError as exc:  # URLError, timeouts, disk errors
        raise DataError(f"could not download {spec.url} ({exc}); {fix}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return final


def locate(spec: CifarSpec, root: str | None, allow_download: bool, downloads: Path) -> tuple[str, Path]:
    """Resolve ``data.root`` (or the cache's downloads folder) to a CIFAR source, downloading if allowed."""
    places: list[Path] = []
    if root:
        places.append(Path(root).expanduser())
        if not places[0].exists():
            raise DataError(
                f"data.root {root!r} does not exist; set data.root to a folder or archive with {spec.title} "
                f"(e.g. --set data.root=../shared/data/{spec.jpeg})"
            )
    if not root or allow_download:
        places.append(downloads)
    for place in places:
        found = find_source(spec, place)
        if found:
            return found
    looked = ", ".join(map(str, places))
    if allow_download:
        try:
            return "python", download(spec, downloads)
        except DataError as exc:
            raise DataError(f"{spec.title} not found in {looked}, and {exc}") from None
    raise DataError(
        f"{spec.title} not found: looked in {looked} for {spec.archive}, {spec.folder}/, "
        f"{spec.jpeg} or a train/ + test/ image folder. Set data.root to a folder or archive with the data "
        f"(e.g. --set data.root=../shared/data/{spec.jpeg}), or data.download=true when online"
    )


def read_cifar(spec: CifarSpec, kind: str, path: Path) -> Raw:
    raw = read_python(spec, path) if kind == "python" else read_image_folder(path)
    if len(raw.classes) != spec.num_classes:
        raise DataError(
            f"{path} has {len(raw.classes)} classes but {spec.title} has {spec.num_classes}; "
            f"use data.dataset=folder for other image folders"
        )
    return raw
