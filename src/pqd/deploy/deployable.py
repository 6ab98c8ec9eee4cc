"""The deployable file format: a model that takes raw images and carries its preprocessing.

* :class:`Preprocessed` wraps a model so that it takes **raw images**: uint8 NCHW in
  [0, 255], or float NCHW in [0, 1]; normalisation happens inside, with exactly the
  arithmetic of pqd's training loader, and ``class_names`` travels as an attribute.
  :func:`deployable_torchscript` traces + freezes a (converted INT8 or FP32) model and
  scripts the wrapper around it, so the file takes both input kinds.
* :func:`save_torchscript` stores a JSON record (:func:`deployable_meta`: format tag,
  mean/std, class names, input layout/shape/dtype, whether normalisation is inside) as the
  TorchScript archive's extra file ``pqd.json``; :func:`read_torchscript_meta` reads it back
  straight from the zip, without loading the model. :func:`onnx_metadata` gives the same
  record as ONNX ``metadata_props``.

Loading deployables and classifying image files is :mod:`pqd.commands.predict` (``pqd predict``).
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pqd.compress.qat import trace
from pqd.errors import CheckpointError

FORMAT = "pqd-deployable"
VERSION = 1
META_NAME = "pqd.json"
DEPLOYABLE_NAMES = ("model_int8.pt", "model_fp32.pt")  # looked for, in this order, in a run folder
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


class Preprocessed(nn.Module):
    """``model`` behind pqd's input normalisation: call it with raw images.

    uint8 input is read as [0, 255] (``x * (1 / (255 * std)) - mean / std``, the training
    loader's arithmetic, so results match bit for bit); floating-point input as [0, 1].
    Input layout NCHW with the channel count of ``mean``.
    """

    if TYPE_CHECKING:  # buffers, registered in __init__ (class annotations would confuse torch.jit.script)
        scale_u8: torch.Tensor
        scale_f: torch.Tensor
        bias: torch.Tensor

    def __init__(
        self, model: nn.Module, mean: Sequence[float], std: Sequence[float], class_names: Sequence[str]
    ) -> None:
        super().__init__()
        if len(mean) != len(std) or not len(mean):
            raise ValueError(f"mean and std need one value per channel, got {list(mean)} and {list(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {list(std)}")
        if not class_names:
            raise ValueError("class_names must not be empty")
        c = len(mean)
        self.model = model
        self.register_buffer("scale_u8", torch.tensor([1.0 / (255.0 * s) for s in std]).view(1, c, 1, 1))
        self.register_buffer("scale_f", torch.tensor([1.0 / s for s in std]).view(1, c, 1, 1))
        self.register_buffer("bias", torch.tensor([-m / s for m, s in zip(mean, std, strict=True)]).view(1, c, 1, 1))
        self.class_names = [str(n) for n in class_names]
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.to(torch.float32) * self.scale_u8 + self.bias
        else:
            x = x.to(torch.float32) * self.scale_f + self.bias
        return self.model(x)

    @torch.jit.export
    def forward_normalized(self, x: torch.Tensor) -> torch.Tensor:
        """The bare model, for input already normalised (pqd's own evaluation code)."""
        return self.model(x)


def normalized_callable(module: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """What pqd's own evaluation and timing code calls with *normalised* float input: a
    deployable's ``forward_normalized`` when it has one (files written by
    :func:`deployable_torchscript`), else the module itself (older files, plain models)."""
    return getattr(module, "forward_normalized", module)


def deployable_meta(
    *,
    mean: Sequence[float],
    std: Sequence[float],
    class_names: Sequence[str],
    input_shape: Sequence[int],
    normalization: str = "inside",
    extra: dict[str, Any] | None = None,
    preprocess: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The record a deployable carries. ``normalization``: "inside" (the file takes raw
    uint8 [0,255] or float [0,1] images) or "outside" (it takes normalised float32).
    ``preprocess``: how an image file becomes the input (``data.image_size`` runs:
    :func:`pqd.data.transforms.preprocess_record`, shorter-side resize + centre crop); absent,
    ``pqd predict`` resizes the shorter side to the input size and centre-crops."""
    if normalization not in ("inside", "outside"):
        raise ValueError(f"normalization must be 'inside' or 'outside', got {normalization!r}")
    raw = "uint8 [0, 255] or float32 [0, 1]"
    return {
        "format": FORMAT,
        "version": VERSION,
        "input": {
            "layout": "NCHW",
            "shape": [int(s) for s in input_shape],
            "dtype": raw if normalization == "inside" else "float32, normalised: (x / 255 - mean) / std",
            "normalization": normalization,
        },
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "class_names": [str(n) for n in class_names],
        **({"preprocess": dict(preprocess)} if preprocess else {}),
        **(extra or {}),
    }


def deployable_torchscript(
    model: nn.Module,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    class_names: Sequence[str],
    input_shape: Sequence[int],
) -> torch.jit.ScriptModule:
    """Trace + freeze ``model`` (FP32 or converted INT8, on normalised input), then script
    :class:`Preprocessed` around it: a TorchScript module that takes raw images."""
    example = torch.zeros(1, *input_shape)
    with torch.no_grad():
        inner = trace(model.eval(), example)
        scripted = torch.jit.script(Preprocessed(inner, mean, std, class_names).eval())
        # freezing inlines the weights (faster, as to_torchscript does); keep what predict and pqd's evaluation read
        return torch.jit.freeze(scripted, preserved_attrs=["class_names", "mean", "std", "forward_normalized"])


def save_torchscript(
    module: torch.jit.ScriptModule, path: str | Path, *, meta: dict[str, Any], overwrite: bool = False
) -> Path:
    """Save ``module`` with ``meta`` as the extra file ``pqd.json`` (atomically, never over a
    file pqd did not write unless ``overwrite``; see :func:`pqd.safety.fsguard.safe_replace`)."""
    from pqd.safety.fsguard import safe_replace

    buf = io.BytesIO()
    torch.jit.save(module, buf, _extra_files={META_NAME: json.dumps(meta)})
    return safe_replace(path, buf.getvalue(), overwrite=overwrite)


def read_torchscript_meta(path: str | Path) -> dict[str, Any] | None:
    """The ``pqd.json`` record of a TorchScript file (None if it has none), read from the zip
    archive without loading the model. A file that is not a TorchScript archive (truncated,
    or something else) raises :class:`CheckpointError`."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith(f"/extra/{META_NAME}")]
            if not names:
                return None
            info = z.getinfo(names[0])
            if info.file_size > 1 << 20:
                raise CheckpointError(
                    f"{str(path)!r}: its {META_NAME} record is {info.file_size} bytes; not a pqd file"
                )
            meta = json.loads(z.read(info).decode("utf-8"))
    except (zipfile.BadZipFile, EOFError) as exc:
        raise CheckpointError(
            f"{str(path)!r} is not a readable TorchScript file ({exc}); it may be truncated: export it again"
        ) from None
    except OSError as exc:
        raise CheckpointError(f"{str(path)!r} cannot be read: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{str(path)!r}: its {META_NAME} record is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r}: its {META_NAME} record is not a {FORMAT} record")
    return meta


def onnx_metadata(meta: dict[str, Any]) -> dict[str, str]:
    """ONNX ``metadata_props`` for ``meta`` (pass to ``pqd.deploy.onnx.export_onnx(metadata=...)``)."""
    return {
        "pqd": json.dumps(meta),
        "mean": json.dumps(meta["mean"]),
        "std": json.dumps(meta["std"]),
        "classes": json.dumps(meta["class_names"]),
        "input_normalization": meta["input"]["normalization"],
    }


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class Deployable:
    """A loaded deployable: ``run(x)`` maps an image batch (uint8 NCHW) to logits."""

    path: Path
    meta: dict[str, Any]
    run: Callable[[torch.Tensor], torch.Tensor]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.meta["input"]["shape"])

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])


def validate_meta(meta: dict[str, Any], where: str) -> dict[str, Any]:
    try:
        c = len(meta["mean"])
        ok = (
            len(meta["std"]) == c
            and len(meta["input"]["shape"]) == 3
            and meta["input"]["shape"][0] == c
            and meta["input"]["normalization"] in ("inside", "outside")
            and len(meta["class_names"]) >= 1
        )
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise CheckpointError(f"{where}: malformed {FORMAT} record {json.dumps(meta)[:200]}")
    return meta
