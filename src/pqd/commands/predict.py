"""``pqd predict``: classify image files with a run's deployed model, the way a user would.

The deployable format (raw-image input, preprocessing record) is :mod:`pqd.deploy.deployable`.
:func:`predict_files` decodes image files with PIL, resizes (shorter side) and centre-crops
them to the model's input size and returns class names with probabilities;
:func:`predict_main` is ``pqd predict RUN_DIR|MODEL IMAGE...``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pqd.data.folder import check_bit_depth, decode_image
from pqd.deploy.deployable import (
    DEPLOYABLE_NAMES,
    IMAGE_SUFFIXES,
    META_NAME,
    Deployable,
    Preprocessed,
    read_torchscript_meta,
    validate_meta,
)
from pqd.errors import CheckpointError, ConfigError, DataError, PqdError

__all__ = ["load_deployable", "load_image", "predict_files", "predict_main"]


def _find_model(source: Path) -> Path:
    if source.is_dir():
        for name in DEPLOYABLE_NAMES + ("model_int8.onnx", "model_fp32.onnx"):
            if (source / name).is_file():
                return source / name
        raise CheckpointError(
            f"{str(source)!r} holds no deployable model ({', '.join(DEPLOYABLE_NAMES)}); is it a finished pqd run folder? "
            "(an FP32-only run written by an older pqd: run `pqd export` on it first)"
        )
    if not source.is_file():
        raise CheckpointError(f"model {str(source)!r} does not exist")
    return source


def load_deployable(source: str | Path) -> Deployable:
    """Load a run folder's deployable (``model_int8.pt`` ...) or a model file (TorchScript
    ``.pt`` or ``.onnx`` with pqd metadata) with its preprocessing record."""
    src = Path(source)
    path = _find_model(src)
    where = f"{str(path)!r}"
    if path.suffix == ".onnx":
        return _load_onnx(path)
    meta = read_torchscript_meta(path)
    if meta is None:
        raise CheckpointError(
            f"{where} carries no preprocessing record ({META_NAME}); re-export it with this pqd version"
        )
    meta = validate_meta(meta, where)
    try:
        module = torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as exc:  # torch raises RuntimeError/ValueError for corrupt archives
        raise CheckpointError(
            f"{where} is not a loadable TorchScript model ({type(exc).__name__}: {str(exc)[:200]})"
        ) from None
    if meta["input"]["normalization"] == "outside":
        mean, std = meta["mean"], meta["std"]
        inner = module
        module = Preprocessed(inner, mean, std, meta["class_names"]).eval()
    return Deployable(path, meta, module)


def _load_onnx(path: Path) -> Deployable:
    try:
        import onnxruntime as ort
    except ImportError:
        raise PqdError("predicting with an ONNX file needs onnxruntime: pip install 'pqd[export]'") from None
    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise CheckpointError(f"{str(path)!r} is not a loadable ONNX model ({str(exc)[:200]})") from None
    props = sess.get_modelmeta().custom_metadata_map
    if "pqd" not in props:
        raise CheckpointError(f"{str(path)!r} carries no pqd preprocessing record (metadata 'pqd'); re-export it")
    try:
        meta = validate_meta(json.loads(props["pqd"]), str(path))
    except ValueError:
        raise CheckpointError(f"{str(path)!r}: its 'pqd' metadata is not valid JSON") from None
    inp = sess.get_inputs()[0]
    mean = torch.tensor(meta["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(meta["std"]).view(1, -1, 1, 1)
    inside = meta["input"]["normalization"] == "inside"
    wants_uint8 = "uint8" in inp.type

    def run(x: torch.Tensor) -> torch.Tensor:
        if not inside:
            x = (x.to(torch.float32) / 255.0 - mean) / std
        elif not wants_uint8 and x.dtype == torch.uint8:
            x = x.to(torch.float32) / 255.0
        return torch.from_numpy(sess.run(None, {inp.name: x.contiguous().numpy()})[0])

    return Deployable(path, meta, run)


# --------------------------------------------------------------------------- images


def load_image(
    path: str | Path, *, size: tuple[int, int], channels: int, preprocess: dict[str, Any] | None = None
) -> torch.Tensor:
    """Decode ``path`` to uint8 ``[channels, H, W]``: shorter side resized to fit, then a
    centre crop to ``size`` (H, W). With a deployable's ``preprocess`` record (``data.image_size``
    runs), exactly the evaluation crop of training (:func:`pqd.data.transforms.eval_crop`).
    Unreadable files raise :class:`DataError`."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    h, w = size
    if preprocess is not None:
        crop, resize = int(preprocess["center_crop"]), int(preprocess["resize_shorter"])
        if (crop, crop) != (h, w) or channels != 3:
            raise CheckpointError(f"preprocess record {preprocess} does not match the model input {channels}x{h}x{w}")
        try:
            encoded = path.read_bytes()
        except FileNotFoundError:
            raise DataError(f"image {str(path)!r} does not exist") from None
        except OSError as exc:
            raise DataError(f"image {str(path)!r} cannot be read: {exc}") from None
        return torch.from_numpy(decode_image(encoded, str(path), crop=(crop, resize)).transpose(2, 0, 1).copy())
    try:
        with Image.open(path) as img:
            check_bit_depth(img, repr(str(path)))  # the training loader's rule: never a clipped image
            img = img.convert("RGB" if channels == 3 else "L")
            s = max(h / img.height, w / img.width)
            nh, nw = max(h, round(img.height * s)), max(w, round(img.width * s))
            if (nh, nw) != (img.height, img.width):
                img = img.resize((nw, nh), Image.Resampling.BILINEAR)
            top, left = (nh - h) // 2, (nw - w) // 2
            img = img.crop((left, top, left + w, top + h))
            data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    except FileNotFoundError:
        raise DataError(f"image {str(path)!r} does not exist") from None
    except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise DataError(f"image {str(path)!r} cannot be used: {exc}") from None
    except OSError as exc:
        raise DataError(f"image {str(path)!r} cannot be read: {exc}") from None
    if channels not in (1, 3):
        raise DataError(f"the model takes {channels}-channel images; pqd predict decodes 1 (grey) or 3 (RGB)")
    return data.view(h, w, channels).permute(2, 0, 1).contiguous()


def _expand(paths: Sequence[str | Path]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file()))
        else:
            out.append(p)
    if not out:
        raise DataError("no images given (pass image files or folders of images)")
    return out


def predict_files(
    source: str | Path | Deployable, image_paths: Sequence[str | Path], *, top_k: int = 1, batch_size: int = 64
) -> list[dict[str, Any]]:
    """Classify image files with a deployable (a run folder, a model file, or a
    :class:`Deployable`). Returns one record per image: ``image``, ``class``, ``probability``
    and ``top`` (the ``top_k`` best ``{"class", "index", "probability"}``)."""
    dep = source if isinstance(source, Deployable) else load_deployable(source)
    c, h, w = dep.input_shape
    names = dep.class_names
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ConfigError(f"top_k = {top_k!r}: give how many best classes to list, 1 or more")
    paths = _expand(image_paths)
    k = min(top_k, len(names))
    out: list[dict[str, Any]] = []
    with torch.no_grad():
        for i in range(0, len(paths), batch_size):
            chunk = paths[i : i + batch_size]
            x = torch.stack(
                [load_image(p, size=(h, w), channels=c, preprocess=dep.meta.get("preprocess")) for p in chunk]
            )
            logits = dep.run(x)
            if logits.ndim != 2 or logits.shape[1] != len(names):
                raise CheckpointError(
                    f"{dep.path}: the model gives logits of shape {tuple(logits.shape)} for {len(names)} class names"
                )
            prob = torch.softmax(logits.float(), dim=1)
            pv, pi = prob.topk(k, dim=1)
            for p, vals, idx in zip(chunk, pv.tolist(), pi.tolist(), strict=True):
                top = [{"class": names[j], "index": j, "probability": v} for v, j in zip(vals, idx, strict=True)]
                out.append(
                    {"image": str(p), "class": top[0]["class"], "probability": top[0]["probability"], "top": top}
                )
    return out


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of classes, 1 or more, got {text!r}")
    return value


def predict_main(argv: Sequence[str] | None = None) -> int:
    """``pqd predict RUN_DIR|MODEL IMAGE... [--top-k K] [--json]``."""
    parser = argparse.ArgumentParser(
        prog="pqd predict",
        description="classify images with a finished run's deployable model, "
        "the way a user of the exported file would (preprocessing from the file)",
    )
    parser.add_argument("model", type=Path, help="run folder, or a model_int8.pt / .onnx file written by pqd")
    parser.add_argument("images", nargs="+", type=Path, help="image files or folders of images")
    parser.add_argument("--top-k", type=_positive_int, default=1, help="list the K best classes (K >= 1; default 1)")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of lines")
    args = parser.parse_args(argv)
    try:
        results = predict_files(args.model, args.images, top_k=args.top_k)
    except PqdError as exc:
        print(f"pqd: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        for r in results:
            print(f"{r['image']}\t" + ", ".join(f"{t['class']} {100 * t['probability']:.1f}%" for t in r["top"]))
    return 0


if __name__ == "__main__":
    sys.exit(predict_main())
