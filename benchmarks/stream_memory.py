"""Peak memory of a 224x224 image folder larger than ``data.max_memory_gb``: generated JPEGs, streamed.

    python benchmarks/stream_memory.py --images 50000 --root /tmp/folder224     # generates the folder once
    python benchmarks/stream_memory.py --images 50000 --root /tmp/folder224 --max-memory-gb 4

Generates ``--images`` training JPEGs (10 classes, sizes 256x320, 300x300 and 480x360, grey and RGBA among
them) plus a 1,000-image test split, unless the folder already holds them. Then, in a child process of its
own, ``pqd.data.load_data`` with ``image_size: 224`` and ``max_memory_gb`` (the decoded set, 7.5 GB for
50,000 images, is over it, so pqd streams), and one pass over every training batch the way an epoch
draws them (shuffled, RandomResizedCrop + flip, ``data.workers`` decoder processes). Peak resident memory of
the main process and of the decoder processes is read from ``getrusage`` (``RUSAGE_SELF`` / ``RUSAGE_CHILDREN``:
each child's own high-water mark, the largest one) after the pass.

Writes ``--out``.json and .md (default ``benchmarks/results/stream_memory``).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

SIZES = ((320, 256), (300, 300), (480, 360))  # (width, height) of the generated images
MODES = ("RGB", "RGB", "RGB", "L", "RGBA")


def generate(root: Path, n_train: int, n_test: int = 1000, classes: int = 10) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            c = i % classes
            path = root / split / f"c{c}" / f"{i:06d}.jpg"
            if path.exists():
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            w, h = SIZES[i % len(SIZES)]
            base = rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)  # a blocky image: realistic JPEG sizes
            img = Image.fromarray(base).resize((w, h)).convert(MODES[i % len(MODES)])
            (img.convert("RGB") if img.mode == "RGBA" else img).save(path, quality=85)


def child(root: str, max_memory_gb: float, batch_size: int, workers: int) -> dict:
    import torch

    from pqd.config import DataConfig
    from pqd.data import load_data
    from pqd.data.loader import batches

    t0 = time.perf_counter()
    cfg = DataConfig(dataset="folder", root=root, image_size=224, max_memory_gb=max_memory_gb, workers=workers)
    data = load_data(cfg)
    t_load = time.perf_counter() - t0
    n = 0
    g = torch.Generator().manual_seed(0)
    t1 = time.perf_counter()
    for x, _ in batches(
        data.train,
        batch_size=batch_size,
        mean=data.mean,
        std=data.std,
        shuffle=True,
        augment=True,
        generator=g,
        crop_scale=data.crop_scale,
    ):
        n += x.shape[0]
    t_pass = time.perf_counter() - t1
    return {
        "train_images": len(data.train),
        "streamed": type(data.train).__name__ == "FileDataset",
        "images_seen": n,
        "load_s": round(t_load, 1),
        "pass_s": round(t_pass, 1),
        "images_per_s": round(n / t_pass, 1),
        "peak_rss_main_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_rss_largest_child_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=50000)
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--max-memory-gb", type=float, default=4.0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/stream_memory"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(str(a.root), a.max_memory_gb, a.batch_size, a.workers)))
        return 0
    t0 = time.perf_counter()
    generate(a.root, a.images)
    gen_s = time.perf_counter() - t0
    cmd = [sys.executable, __file__, "--child", "--root", str(a.root), "--max-memory-gb", str(a.max_memory_gb)]
    cmd += ["--batch-size", str(a.batch_size), "--workers", str(a.workers)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    disk = sum(f.stat().st_size for f in (a.root / "train").rglob("*.jpg"))
    rec |= {
        "command": "python benchmarks/stream_memory.py " + " ".join(sys.argv[1:]),
        "generated_train_images": a.images,
        "jpeg_bytes_on_disk": disk,
        "decoded_bytes_if_in_memory": a.images * 3 * 224 * 224,
        "max_memory_gb": a.max_memory_gb,
        "workers": a.workers,
        "batch_size": a.batch_size,
        "generate_s": round(gen_s, 1),
        "machine_memory_gb": round(
            int(next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal")).split()[1])
            / 1e6,
            1,
        ),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(rec, indent=1))
    md = ["# Streaming a 224x224 image folder: peak memory", "", f"Command: `{rec['command']}`", ""]
    md += [f"- {k}: {v}" for k, v in rec.items() if k != "command"]
    a.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
