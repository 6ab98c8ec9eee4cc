"""A small image folder of mixed sizes and modes for the ``data.image_size`` tests and docs.

``python tests/data/mixedfolder.py OUT [N_TRAIN N_TEST]`` writes ``OUT/train/<class>/*`` and
``OUT/test/<class>/*``: three colour-coded classes, images of three sizes, as RGB JPEGs and
grey, palette and RGBA PNGs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("blue", "green", "red")
SIZES = ((40, 30), (64, 64), (50, 80))  # (width, height)
MODES = ("RGB", "L", "P", "RGBA")


def image(rng: np.random.Generator, label: int, size: tuple[int, int]) -> np.ndarray:
    """uint8 [H, W, 3]: noise with a brighter square in the channel of the class (2 - label)."""
    w, h = size
    x = rng.integers(0, 90, (h, w, 3), dtype=np.uint8)
    top, left = rng.integers(0, h // 3 + 1), rng.integers(0, w // 3 + 1)
    x[top : top + 2 * h // 3, left : left + 2 * w // 3, 2 - label] = rng.integers(170, 256)
    x[top : top + 2 * h // 3, left : left + 2 * w // 3, (label + 1) % 3] //= (
        1 + label
    )  # grey images still differ per class
    return x


def write_mixed_folder(root: Path, *, n_train: int = 12, n_test: int = 6, seed: int = 0) -> list[Path]:
    """Write the folder; returns the test files in load order (class, then name)."""
    rng = np.random.default_rng(seed)
    test_files: list[Path] = []
    k = 0
    for split, n in (("train", n_train), ("test", n_test)):
        for label, cls in enumerate(CLASSES):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = image(rng, label, SIZES[k % len(SIZES)])
                mode = MODES[k % len(MODES)]
                k += 1
                im = Image.fromarray(arr)
                if mode == "RGB":
                    path = d / f"{i:03d}.jpg"
                    im.save(path, quality=90)
                else:
                    path = d / f"{i:03d}.png"
                    if mode == "L":
                        im = im.convert("L")
                    elif mode == "P":
                        im = im.convert("P", palette=Image.ADAPTIVE, colors=64)
                    else:
                        im = im.convert("RGBA")
                        im.putalpha(Image.fromarray(rng.integers(128, 256, arr.shape[:2], dtype=np.uint8)))
                    im.save(path)
                if split == "test":
                    test_files.append(path)
    return test_files


if __name__ == "__main__":
    out = Path(sys.argv[1])
    n_train, n_test = (int(sys.argv[2]), int(sys.argv[3])) if len(sys.argv) > 3 else (12, 6)
    write_mixed_folder(out, n_train=n_train, n_test=n_test)
    print(f"wrote {out}: {len(CLASSES)} classes, {n_train} train + {n_test} test images per class")
