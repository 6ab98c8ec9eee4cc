"""Train a run config's dense teacher exactly as the pipeline does, and measure it.

    PYTHONPATH=src python tools/gpu/gpu_teacher.py configs/gpu_resnet18_cifar10.yaml \
        --set data.root=../shared/data/cifar10-jpeg.tar.gz --json runs/gpu_teacher_c10.json [--save T.safetensors]

Reports top-1 on the full test split, accuracy on (up to) 10k un-augmented training images (the
overfitting check), wall time and images/s. ``--save`` writes the weights rounded to
bfloat16-representable values (still FP32 tensors) for the chunked GPU study: such a file
compresses to about half with zstd, so the teacher fits the device's transfer limits; every
accuracy in the JSON is measured on the rounded weights too (``top1_bf16_rounded``), and the study
measures its dense baseline on exactly the weights it distils from.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from pqd.data import load_data
from pqd.measure import predict, top1
from pqd.models.registry import create_model
from pqd.run.config import load_config
from pqd.train import save_checkpoint, train
from pqd.train.loop import default_device


def bf16_rounded(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating tensors rounded to the nearest bfloat16 value, kept in their dtype; others untouched."""
    return {k: v.to(torch.bfloat16).to(v.dtype) if v.is_floating_point() else v for k, v in state.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", type=Path)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--json", type=Path, default=None, help="write the record here")
    ap.add_argument("--save", type=Path, default=None, help="save the bf16-rounded weights here (safetensors)")
    ap.add_argument("--train-eval-images", type=int, default=10000)
    a = ap.parse_args(argv)
    cfg = load_config(a.config, a.overrides)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.seed)
    device = default_device()
    t0 = time.perf_counter()
    data = load_data(cfg.data, seed=cfg.seed)
    t_data = time.perf_counter() - t0
    kw = {"width": cfg.model.width} if cfg.model.width != 1.0 else {}
    if cfg.model.dropout:
        kw["dropout"] = cfg.model.dropout
    model = create_model(cfg.model.name, num_classes=data.num_classes, **kw).to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    t1 = time.perf_counter()
    train(
        model,
        data,
        epochs=cfg.teacher.epochs,
        lr=cfg.teacher.lr,
        config=cfg.train,
        seed=cfg.seed,
        tag="teacher",
        amp=True,
        augment=cfg.data.augment,
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
    t_train = time.perf_counter() - t1
    ebs = cfg.train.eval_batch_size
    train_eval = data.train.subset(torch.arange(min(a.train_eval_images, len(data.train))))

    def accuracy(m):
        return (
            top1(predict(m, data.test, mean=data.mean, std=data.std, batch_size=ebs), data.test.y),
            top1(predict(m, train_eval, mean=data.mean, std=data.std, batch_size=ebs), train_eval.y),
        )

    test_acc, train_acc = accuracy(model)
    rounded = bf16_rounded(model.state_dict())
    model.load_state_dict(rounded)
    test_rounded, train_rounded = accuracy(model)
    rec = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "config": str(a.config),
        "overrides": a.overrides,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "dataset": data.name,
        "train_images": len(data.train),
        "test_images": len(data.test),
        "model": cfg.model.name,
        "width": cfg.model.width,
        "epochs": cfg.teacher.epochs,
        "lr": cfg.teacher.lr,
        "batch_size": cfg.train.batch_size,
        "label_smoothing": cfg.train.label_smoothing,
        "weight_decay": cfg.train.weight_decay,
        "top1": test_acc,
        "train_top1": train_acc,
        "train_eval_images": len(train_eval),
        "top1_bf16_rounded": test_rounded,
        "train_top1_bf16_rounded": train_rounded,
        "data_load_s": round(t_data, 2),
        "train_s": round(t_train, 2),
        "train_images_per_s": round(
            cfg.teacher.epochs * (len(data.train) // cfg.train.batch_size) * cfg.train.batch_size / t_train, 1
        ),
    }
    if a.save:
        a.save.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(
            a.save,
            {k: v.detach().cpu().contiguous() for k, v in rounded.items()},
            {"model": cfg.model.name, "num_classes": data.num_classes, "rounded": "bfloat16"},
        )
        rec["saved"] = str(a.save)
    print(json.dumps(rec, indent=2))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(rec, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
