"""Image preprocessing for ``data.image_size``: the evaluation crop and the training augmentation.

* :func:`eval_crop`: resize the shorter side to ``resize_size`` (bilinear, PIL), then a centre
  crop of ``image_size`` x ``image_size``. The one definition used by the in-memory and the
  streaming datasets and by ``pqd predict`` (through the deployable's ``preprocess`` record),
  so the same file gives the same uint8 tensor on every path.
* :func:`draw_rrc` / :func:`apply_rrc`: RandomResizedCrop + horizontal flip, applied to the
  evaluation crop of each image (the stored image), so in-memory and streaming training see
  the same pixels for the same draws. The draws come from a CPU generator in the main
  process, batch by batch, like the 32x32 pad-crop draws.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

DEFAULT_CROP_RATIO = 0.875  # image_size / resize_size: the usual 224 / 256
RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect ratio range
ATTEMPTS = 10


def default_resize(image_size: int) -> int:
    """Shorter side before the centre crop: ``round(image_size / 0.875)`` (256 for 224)."""
    return int(round(image_size / DEFAULT_CROP_RATIO))


def preprocess_record(image_size: int, resize_size: int) -> dict[str, Any]:
    """What a deployable carries to reproduce :func:`eval_crop` (``meta["preprocess"]``)."""
    return {
        "resize_shorter": int(resize_size),
        "center_crop": int(image_size),
        "interpolation": "bilinear",
        "mode": "RGB",
    }


def eval_crop(img: Image.Image, *, image_size: int, resize_size: int) -> np.ndarray:
    """``img`` (RGB) with its shorter side resized to ``resize_size`` and centre-cropped to a square
    of ``image_size``: uint8 ``[image_size, image_size, 3]``."""
    w, h = img.size
    s = resize_size / min(w, h)
    nw, nh = max(resize_size, round(w * s)), max(resize_size, round(h * s))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BILINEAR)
    left, top = (nw - image_size) // 2, (nh - image_size) // 2
    return np.asarray(img.crop((left, top, left + image_size, top + image_size)))


def draw_rrc(
    b: int, size: int, *, scale: tuple[float, float], hflip: bool, generator: torch.Generator | None
) -> torch.Tensor:
    """RandomResizedCrop boxes on a ``size`` x ``size`` image, torchvision's algorithm: ``[b, 5]`` int64
    columns ``top, left, height, width, flip`` (flip always 0 without ``hflip``, which draws nothing)."""
    area = size * size
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    out = torch.zeros(b, 5, dtype=torch.int64)
    for i in range(b):
        u = torch.rand(ATTEMPTS, 4, generator=generator).tolist()
        box = (0, 0, size, size)  # fallback: the whole image
        for a, r, t, lft in u:
            target = area * (scale[0] + a * (scale[1] - scale[0]))
            aspect = math.exp(log_ratio[0] + r * (log_ratio[1] - log_ratio[0]))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= size and 0 < h <= size:
                box = (int(t * (size - h + 1)), int(lft * (size - w + 1)), h, w)
                break
        out[i, :4] = torch.tensor(box)
    if hflip:
        out[:, 4] = (torch.rand(b, generator=generator) < 0.5).long()
    return out


def apply_rrc(x: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """Crop each uint8 image of ``x [b, C, S, S]`` to its box in ``draws``, resize it back to S x S
    (bilinear, antialiased), flip where drawn; uint8 out (rounded)."""
    s = x.shape[-1]
    out = torch.empty_like(x)
    for i, (top, left, h, w, flip) in enumerate(draws.tolist()):
        crop = x[i : i + 1, :, top : top + h, left : left + w].float()
        if (h, w) != (s, s):
            crop = F.interpolate(crop, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        if flip:
            crop = crop.flip(-1)
        out[i] = crop[0].round_().clamp_(0, 255).to(torch.uint8)
    return out
