"""Image folders ``train/<class>/*`` + ``test/<class>/*``, from a directory or a (streamed) tar archive."""

from __future__ import annotations

import io
import os
import tarfile
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from pqd.data.base import Raw
from pqd.data.transforms import eval_crop
from pqd.errors import DataError

SPLITS = ("train", "test")
LAYOUT = "train/<class>/* and test/<class>/*"
MAX_MEMBER_BYTES = 64 << 20  # one image file in an archive; a bigger member is not an image pqd could use

# split -> class -> [(display name, bytes or path)]
_Files = dict[str, dict[str, list[tuple[str, "bytes | Path"]]]]


def check_bit_depth(im: Image.Image, name: str) -> None:
    """Refuse a 16-bit or floating-point image: PIL's ``convert("RGB")`` would clip it to 0/255 (a
    silently white image). The one rule for training data and ``pqd predict``."""
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        raise DataError(
            f"image {name} has {im.mode} pixels (16-bit or floating point); pqd reads 8-bit images "
            "and would clip it. Convert it to 8-bit RGB (or grey) first."
        )


def decode_image(data: bytes, name: str, *, crop: tuple[int, int] | None = None) -> np.ndarray:
    """Decode one image file to a uint8 ``[H, W, 3]`` RGB array (grey/RGBA/palette are converted;
    16-bit and float images are refused by :func:`check_bit_depth`). ``crop=(image_size, resize_size)``:
    then the evaluation crop of :func:`pqd.data.transforms.eval_crop`, ``[image_size, image_size, 3]``."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            check_bit_depth(im, name)
            rgb = im if im.mode == "RGB" else im.convert("RGB")
            if crop is not None:
                return eval_crop(rgb, image_size=crop[0], resize_size=crop[1])
            return np.asarray(rgb)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {name}: {exc}. Replace or delete that file.") from None


def iter_tar(path: Path, want: Callable[[str], bool]) -> Iterator[tuple[str, bool, bytes | None]]:
    """Stream ``path`` (tar, tar.gz, ...): yield ``(member name, is_dir, bytes if want(name) else None)``."""
    try:
        with tarfile.open(path, mode="r|*") as tf:
            for m in tf:
                if m.isdir():
                    yield m.name, True, None
                elif m.isfile():
                    data = None
                    if want(m.name):
                        if m.size > MAX_MEMBER_BYTES:  # never read a member whole into memory past the cap
                            raise DataError(
                                f"archive {path}: member {m.name} is {m.size:,} bytes, more than the "
                                f"{MAX_MEMBER_BYTES >> 20} MiB an image file may have; remove it from the archive"
                            )
                        data = tf.extractfile(m).read(MAX_MEMBER_BYTES + 1)  # type: ignore[union-attr]
                    yield m.name, False, data
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise DataError(f"archive {path} is corrupt or truncated ({exc}); download or create it again") from None


def is_archive(path: Path) -> bool:
    try:
        return path.is_file() and tarfile.is_tarfile(path)
    except OSError:
        return False


def _hidden(parts: tuple[str, ...]) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def read_image_folder(path: Path) -> Raw:
    """Decode every image under ``path`` (a directory or a tar archive) into uint8 NCHW arrays."""
    if not path.exists():
        raise DataError(f"{path} does not exist; set data.root to a directory or .tar.gz with {LAYOUT}")
    if path.is_dir():
        files, dirs = _scan_dir(path)
    elif is_archive(path):
        files, dirs = _scan_tar(path)
    else:
        raise DataError(f"{path} is neither a directory nor a tar/.tar.gz archive; data.root needs {LAYOUT}")
    return _assemble(path, files, dirs)


def _find_base(path: Path) -> Path:
    """``path`` itself or its single sub-directory that holds train/ and test/ (a wrapper folder)."""
    if any((path / s).is_dir() for s in SPLITS):
        return path
    subs = [
        d for d in path.iterdir() if d.is_dir() and not d.name.startswith(".") and any((d / s).is_dir() for s in SPLITS)
    ]
    return subs[0] if len(subs) == 1 else path


def _scan_dir(path: Path) -> tuple[_Files, dict[str, set[str]]]:
    base = _find_base(path)
    files: _Files = {s: defaultdict(list) for s in SPLITS}
    dirs: dict[str, set[str]] = {s: set() for s in SPLITS}
    for split in SPLITS:
        if not (base / split).is_dir():
            continue
        for cdir in sorted((base / split).iterdir()):
            if not cdir.is_dir() or cdir.name.startswith("."):
                continue
            dirs[split].add(cdir.name)
            for dirpath, dirnames, filenames in os.walk(cdir):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                for fn in filenames:
                    if not fn.startswith("."):
                        p = Path(dirpath, fn)
                        files[split][cdir.name].append((str(p), p))
    return files, dirs


def _scan_tar(path: Path) -> tuple[_Files, dict[str, set[str]]]:
    files: _Files = {s: defaultdict(list) for s in SPLITS}
    dirs: dict[str, set[str]] = {s: set() for s in SPLITS}
    prefix: tuple[str, ...] | None = None

    def locate(name: str) -> tuple[str, ...] | None:
        """Parts below the split root (``split, class, ...``), or None for members outside it."""
        nonlocal prefix
        parts = tuple(p for p in PurePosixPath(name).parts if p not in (".", "/"))
        if _hidden(parts):
            return None
        if prefix is None:  # the first member under train/ or test/ fixes an optional wrapper folder
            k = 0 if parts[:1] and parts[0] in SPLITS else 1 if len(parts) > 1 and parts[1] in SPLITS else None
            if k is None:
                return None
            prefix = parts[:k]
        if parts[: len(prefix)] != prefix or len(parts) <= len(prefix) or parts[len(prefix)] not in SPLITS:
            return None
        return parts[len(prefix) :]

    def want(name: str) -> bool:
        rest = locate(name)
        return rest is not None and len(rest) >= 3

    for name, is_dir, data in iter_tar(path, want):
        rest = locate(name)
        if rest is None or len(rest) < 2:
            continue
        split, cls = rest[0], rest[1]
        if is_dir or len(rest) >= 3:  # a file right under train/ is not a class
            dirs[split].add(cls)
        if data is not None:
            files[split][cls].append((f"{path}:{name}", data))
    return files, dirs


def list_image_folder(path: Path) -> tuple[tuple[str, ...], dict[str, list[tuple[str, bytes | Path, int]]]]:
    """``(classes, {split: [(display name, bytes or path, label)]})`` of an image folder (directory or
    tar archive; a tar's files are read into memory), in a fixed order, without decoding any image."""
    if not path.exists():
        raise DataError(f"{path} does not exist; set data.root to a directory or .tar.gz with {LAYOUT}")
    if path.is_dir():
        files, dirs = _scan_dir(path)
    elif is_archive(path):
        files, dirs = _scan_tar(path)
    else:
        raise DataError(f"{path} is neither a directory nor a tar/.tar.gz archive; data.root needs {LAYOUT}")
    classes = _check_classes(path, files, dirs)
    out = {
        split: [
            (name, src, label)
            for label, cls in enumerate(classes)
            for name, src in sorted(files[split][cls], key=lambda t: t[0])
        ]
        for split in SPLITS
    }
    return classes, out


def _check_classes(path: Path, files: _Files, dirs: dict[str, set[str]]) -> tuple[str, ...]:
    for split in SPLITS:
        if not dirs[split]:
            raise DataError(f"{path} has no {split}/ folder with class sub-folders; expected {LAYOUT}")
        for cls in sorted(dirs[split]):
            if not files[split].get(cls):
                raise DataError(
                    f"class folder {split}/{cls} in {path} is empty; add images or remove the folder from both train/ and test/"
                )
    train_cls, test_cls = set(dirs["train"]), set(dirs["test"])
    if train_cls != test_cls:
        diff = []
        if train_cls - test_cls:
            diff.append(f"only in train/: {', '.join(sorted(train_cls - test_cls))}")
        if test_cls - train_cls:
            diff.append(f"only in test/: {', '.join(sorted(test_cls - train_cls))}")
        raise DataError(
            f"train/ and test/ in {path} have different classes ({'; '.join(diff)}); both need the same class folders"
        )
    classes = tuple(sorted(train_cls))
    if len(classes) < 2:
        raise DataError(
            f"{path} has one class folder ({classes[0]}); a classifier needs at least 2 classes. "
            f"Add a folder per class under both train/ and test/ ({LAYOUT})"
        )
    return classes


def read_source(name: str, src: bytes | Path) -> bytes:
    """The bytes of one image file of :func:`list_image_folder`."""
    if isinstance(src, Path):
        try:
            return src.read_bytes()
        except OSError as exc:
            raise DataError(f"cannot read image {name}: {exc}. Check its permissions or delete it.") from None
    return src


def _assemble(path: Path, files: _Files, dirs: dict[str, set[str]]) -> Raw:
    classes = _check_classes(path, files, dirs)
    first: tuple[str, tuple[int, ...]] | None = None
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split in SPLITS:
        images: list[np.ndarray] = []
        labels: list[int] = []
        for label, cls in enumerate(classes):
            for name, src in sorted(files[split][cls], key=lambda t: t[0]):
                img = decode_image(read_source(name, src), name)
                if first is None:
                    first = (name, img.shape)
                elif img.shape != first[1]:
                    (h, w, _), (fh, fw, _) = img.shape, first[1]
                    raise DataError(
                        f"image {name} is {w}x{h} but {first[0]} is {fw}x{fh}; all images must share one size: set data.image_size (e.g. 224) to resize and crop them"
                    )
                images.append(img)
                labels.append(label)
        out[split] = (np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2)), np.asarray(labels, dtype=np.int64))
    return Raw(*out["train"], *out["test"], classes)
