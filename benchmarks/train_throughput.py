"""Training-loop CPU throughput (images/s) in the FP32, QAT and KD phases.

    python benchmarks/train_throughput.py [--width 0.25] [--images 4096] [--threads 2]

Uses in-memory random CIFAR-shaped data through pqd's own loop (tensor-resident data,
batch-level augmentation), so it measures the loop, not a dataset. Results go to
benchmarks/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import warnings
from pathlib import Path

import torch

from pqd.compress.student import Student
from pqd.config import TrainConfig
from pqd.data import Dataset, Splits
from pqd.measure import environment
from pqd.models.registry import create_model
from pqd.stages.distill import DistillConfig, distill
from pqd.stages.quantize import QuantizeConfig, quantize
from pqd.train import train


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/train_throughput.json"))
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    ds = Dataset(
        x=torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8, generator=g),
        y=torch.randint(0, 10, (args.images,), generator=g),
        classes=tuple(map(str, range(10))),
    )
    data = Splits(name="random", train=ds, val=None, test=ds, mean=(0.5,) * 3, std=(0.25,) * 3, hflip=True)
    cfg = TrainConfig(batch_size=128, progress=False)
    model = create_model("resnet18", width=args.width)
    results = {}

    def timed(name, fn):
        t = time.perf_counter()
        fn()
        results[name] = args.images / (time.perf_counter() - t)
        print(f"{name:<5} {results[name]:7.0f} images/s")

    timed("fp32", lambda: train(model, data, epochs=1, lr=0.01, config=cfg))
    teacher = copy.deepcopy(model)
    q = {}
    timed(
        "qat",
        lambda: q.setdefault("s", quantize(Student(model), QuantizeConfig(), data=data, epochs=1, train_config=cfg)),
    )
    timed("kd", lambda: distill(q["s"], DistillConfig(), teacher=teacher, data=data, epochs=1, train_config=cfg))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"width": args.width, "images": args.images, "images_per_s": results, "env": environment(args.threads)},
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
