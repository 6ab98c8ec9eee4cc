"""Atomic, self-verifying checkpoints in safetensors (no pickle anywhere).

A checkpoint is one ``.safetensors`` file: tensors plus a JSON metadata record that
carries a SHA-256 of the tensor payload. It is written to a temporary file, fsynced,
then renamed over the target, so a kill at any moment leaves either the old file or
the new one, never half of one; a file whose checksum does not match is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save, save_file

from pqd.errors import CheckpointError
from pqd.safety import fsguard
from pqd.safety.fsguard import storage_errors

_META_KEY = "pqd"


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    return hashlib.sha256(save(tensors)).hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same folder + rename), with the
    umask's file mode, storage failures as :class:`pqd.errors.StorageError`, and the file
    recorded in a marked folder's manifest (:mod:`pqd.safety.fsguard`)."""
    fsguard.atomic_write_bytes(path, data)


def _unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, and no two entries sharing storage (safetensors refuses aliases,
    e.g. one observer registered under two names in a quantized graph)."""
    out, seen = {}, set()
    for k, v in tensors.items():
        v = v.detach().cpu().contiguous()
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset()) if v.numel() else None
        if ptr is not None and ptr in seen:
            v = v.clone()
        elif ptr is not None:
            seen.add(ptr)
        out[k] = v
    return out


def save_checkpoint(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None) -> Path:
    """Save ``tensors`` (made contiguous, on CPU) and JSON-able ``meta`` atomically."""
    path = Path(path)
    tensors = _unshare(tensors)
    record = {"meta": meta or {}, "sha256": _digest(tensors)}
    with storage_errors(path, action="creating"):
        path.parent.mkdir(parents=True, exist_ok=True)
    with storage_errors(path, action="creating"):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    try:
        with storage_errors(path, cleanup=[tmp]):  # SafetensorError "os error 28" -> DiskFullError
            save_file(tensors, tmp, metadata={_META_KEY: json.dumps(record)})
        fsguard.commit_file(tmp, path)  # fsync, umask mode, rename, manifest record
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path, *, user_file: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load and verify a checkpoint written by :func:`save_checkpoint`. ``user_file``: a file the
    user passed (e.g. ``pqd analyze --weights``), not one a run recomputes: a damaged one is never
    to be deleted, so the advice says to copy it again instead."""
    path = Path(path)
    remedy = (
        "copy it again from where it came (pqd never changes or deletes your file)"
        if user_file
        else "delete it to recompute"
    )
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(_META_KEY)
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a readable safetensors file ({exc}); {remedy}"
        ) from None
    if raw is None:
        raise CheckpointError(f"checkpoint {str(path)!r} has no pqd metadata; it was not written by pqd")
    try:
        record = json.loads(raw)
        if not isinstance(record, dict) or not isinstance(record.get("meta", {}), dict):
            raise ValueError("not an object")
    except ValueError:
        raise CheckpointError(f"checkpoint {str(path)!r} has malformed pqd metadata; {remedy}") from None
    if record.get("sha256") != _digest(tensors):
        raise CheckpointError(f"checkpoint {str(path)!r} fails its checksum (corrupt file); {remedy}")
    return tensors, record.get("meta", {})


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# torch's own advice around the reason (its substance is in pqd's message: never weights_only=False unless trusted)
_TORCH_BOILERPLATE = (
    "Weights only load failed",
    "In PyTorch",
    "Re-running",
    "Check the documentation",
    "(1)",
    "(2)",
    "Do it only",
    "You can use",
    "This file can still be loaded",
)


def unpickling_reason(exc: BaseException) -> str:
    """The reason torch gives for refusing a file under ``weights_only=True`` (e.g. "Trying to
    load unsupported GLOBAL posix.system ..."), whole sentences, without terminal colour codes."""
    text = _ANSI.sub("", str(exc))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    reasons = [ln for ln in lines if not ln.startswith(_TORCH_BOILERPLATE)]
    reason = " ".join(reasons) or (lines[0] if lines else "")
    if len(reason) > 400:  # cut at a word, never inside one
        reason = reason[:400].rsplit(" ", 1)[0] + " ..."
    return f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a plain weights file: ``.safetensors`` (preferred) or a ``torch.save`` state_dict
    read with ``weights_only=True`` so that it cannot run code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"weights file {str(path)!r} is not valid safetensors: {exc}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError/RuntimeError for unsafe or corrupt files
        raise CheckpointError(
            f"refusing to load {str(path)!r}: it is not a plain tensor state_dict ({unpickling_reason(exc)}). pqd loads "
            "weights only with weights_only=True: loading this file with weights_only=False can run arbitrary code "
            "from it. Only if you trust its source, load it yourself and save its state_dict with "
            "safetensors.torch.save_file, then pass the .safetensors file."
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"weights file {str(path)!r} does not hold a state_dict of tensors")
    return obj


def state_dict_mismatch(model: torch.nn.Module, state: dict[str, torch.Tensor], *, shown: int = 6) -> str | None:
    """What keeps ``state`` from loading into ``model`` (missing keys, unexpected keys, shapes that
    differ, each list cut to ``shown`` names), or None when it fits exactly."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]

    def cut(items: list[str]) -> str:
        return ", ".join(items[:shown]) + (f", ... ({len(items)} in all)" if len(items) > shown else "")

    parts = [
        f"missing keys: {cut(missing)}" if missing else "",
        f"unexpected keys: {cut(unexpected)}" if unexpected else "",
        f"shapes differ (file vs model): {cut(shapes)}" if shapes else "",
    ]
    return "; ".join(p for p in parts if p) or None
