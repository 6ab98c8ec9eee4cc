"""Structured widths chosen on the CPU target, trained at full scale on a GPU: accuracy at equal measured latency.

    PYTHONPATH=src python tools/gpu/structured_gpu.py --teacher T.safetensors \
        --data ../shared/data/cifar10-jpeg.tar.gz --out runs/structured_gpu.json

Latency is a property of the architecture (the widths), accuracy of the training. The CPU study
(benchmarks/structured.py) chose per-group widths by the latency-in-the-loop search and measured
every architecture's OpenVINO INT8 latency on the 2-core target, but could only afford a 2,000-image,
41%-teacher training budget. This script takes those widths from its result files and trains them
at full scale (all 50,000 CIFAR-10 images, a full-accuracy teacher) on whatever device is there:

* each variant is the ``--teacher`` pruned to the recorded widths, kept channels ranked by the
  teacher's own L1 norms (the widths are the CPU search's; only which channels fill them changes);
* every variant, dense included, gets the same recipe: KD fine-tuning in FP32 (``--ft-epochs``),
  then INT8 QAT (``--qat-epochs``), then the converted x86 INT8 model's top-1 on the full test split;
* latency and its ratio to dense are copied from the CPU result file, labelled as such; the script
  checks that each pruned model has exactly the recorded widths, so the latency carries over.

Per-image correctness is stored (hex of packed bits), so paired tests can be re-done; the script
itself adds pooled McNemar tests structured-vs-uniform at each budget and each-vs-dense. Variants
run in the order given and the JSON is rewritten after each one, so a run cut off at its time
limit keeps what it finished.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pqd.compress.channels.graph import ChannelGraph, prune_to_widths
from pqd.compress.channels.importance import group_scores
from pqd.compress.student import Student, convert_student
from pqd.config import DataConfig, TrainConfig
from pqd.data import load_data
from pqd.measure.accuracy import predict, top1
from pqd.measure.stats import mcnemar_pooled, wilson_interval
from pqd.models.registry import create_model
from pqd.stages.distill import DistillConfig, distill
from pqd.stages.quantize import QuantizeConfig, quantize
from pqd.train.checkpoint import load_checkpoint
from pqd.train.loop import default_device

ROOT = Path(__file__).resolve().parents[2]

RESULTS = ROOT / "benchmarks" / "results"
# (label, CPU result file, variant in it): the 2x candidate and its uniform match first, then the rest
DEFAULT_VARIANTS = [
    "dense=structured_resnet18:dense",
    "l1@0.5=structured_resnet18:structured@0.5",
    "uniform@0.5=structured_resnet18:uniform@0.5",
    "l1@0.35=structured_resnet18:structured@0.35",
    "uniform@0.35=structured_resnet18:uniform@0.35",
    "sens@0.75=structured_resnet18_sensitivity:structured@0.75",
    "uniform@0.75=structured_resnet18_sensitivity:uniform@0.75",
]


def parse_variant(spec: str, results_dir: Path) -> dict:
    label, _, src = spec.partition("=")
    fname, _, variant = src.partition(":")
    if not (label and fname and variant):
        raise SystemExit(f"--variants wants LABEL=FILE:VARIANT, got {spec!r}")
    path = results_dir / f"{fname}.json"
    res = json.loads(path.read_text())
    for m in res["models"]:
        for row in m["rows"]:
            if row["variant"] == variant:
                return {
                    "label": label,
                    "source": f"{path.name}:{variant}",
                    "model": m["model"],
                    "width": m["width"],
                    "widths": row["widths"],
                    "cpu_measured_ms": row["measured_ms"],
                    "cpu_ratio_to_dense": row["ratio_to_dense"],
                    "cpu_target": res["args"].get("runtime", "openvino"),
                    "cpu_threads": res["args"].get("threads"),
                    "cpu_batch": res["args"].get("batch"),
                    "cpu_name": (res.get("env") or {}).get("cpu"),
                    "cpu_scale_int8_top1": row.get("int8_top1"),
                }
    raise SystemExit(f"{path}: no variant {variant!r}")


def bits(correct: torch.Tensor) -> str:
    return np.packbits(correct.cpu().numpy().astype(np.uint8)).tobytes().hex()


def unbits(hexstr: str, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(bytes.fromhex(hexstr), dtype=np.uint8))[:n].astype(bool)


def train_variant(model, teacher, data, args, seed: int) -> tuple[torch.Tensor, float, dict]:
    """KD fine-tune (FP32) -> INT8 QAT; per-image correctness of the converted INT8 model on the test split."""
    device = next(teacher.parameters()).device
    tc = TrainConfig(
        batch_size=args.batch_size,
        eval_batch_size=1000,
        progress=False,
        channels_last=device.type == "cuda",
        warmup_epochs=args.warmup_epochs,
        weight_decay=args.weight_decay,
    )
    times = {}
    t = time.perf_counter()
    st = Student(copy.deepcopy(model).to(device))
    if args.ft_epochs:
        st = distill(
            st,
            DistillConfig(lr=args.ft_lr),
            teacher=teacher,
            data=data,
            epochs=args.ft_epochs,
            train_config=tc,
            seed=seed,
        )
    times["ft_s"] = time.perf_counter() - t
    fp32_top1 = top1(predict(st.model, data.test, mean=data.mean, std=data.std, batch_size=1000), data.test.y)
    t = time.perf_counter()
    st = quantize(st, QuantizeConfig(lr=args.qat_lr), data=data, epochs=args.qat_epochs, train_config=tc, seed=seed)
    times["qat_s"] = time.perf_counter() - t
    t = time.perf_counter()
    int8 = convert_student(st)
    correct = predict(int8, data.test, mean=data.mean, std=data.std, batch_size=500).argmax(1) == data.test.y
    times["int8_eval_s"] = time.perf_counter() - t
    return correct, fp32_top1, times


def paired_tests(rows: list[dict], n: int) -> dict:
    """Pooled McNemar over the seeds both variants finished: structured vs uniform at each budget, each vs dense."""
    by = {r["label"]: {s["seed"]: unbits(s["correct_bits"], n) for s in r["seeds"]} for r in rows}

    def test(a, b):
        seeds = sorted(set(by[a]) & set(by[b]))
        if not seeds:
            return None
        pairs = [(int((by[a][s] & ~by[b][s]).sum()), int((~by[a][s] & by[b][s]).sum())) for s in seeds]
        diff = float(np.mean([by[a][s].mean() - by[b][s].mean() for s in seeds]))
        return {**mcnemar_pooled(pairs), "first": a, "second": b, "seeds": seeds, "first_minus_second": diff}

    out = {}
    labels = list(by)
    for a in labels:
        if a != "dense" and "dense" in by:
            out[f"{a} vs dense"] = test(a, "dense")
        budget = a.split("@")[1] if "@" in a else None
        if budget and not a.startswith("uniform"):
            u = f"uniform@{budget}"
            if u in by:
                out[f"{a} vs {u}"] = test(a, u)
    return {k: v for k, v in out.items() if v}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--teacher",
        required=True,
        help="safetensors of the full-width FP32 teacher (e.g. tools/gpu/gpu_teacher.py --save)",
    )
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"))
    p.add_argument("--dataset", default="cifar10")
    p.add_argument(
        "--variants",
        nargs="+",
        default=DEFAULT_VARIANTS,
        metavar="LABEL=FILE:VARIANT",
        help="FILE is a benchmarks/structured.py result in --results-dir, without .json",
    )
    p.add_argument("--results-dir", type=Path, default=RESULTS)
    p.add_argument("--train-subset", type=int, default=None, help="default: the whole training split")
    p.add_argument("--test-subset", type=int, default=None, help="default: the whole test split")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--ft-epochs", type=int, default=8)
    p.add_argument("--ft-lr", type=float, default=0.04)
    p.add_argument("--qat-epochs", type=int, default=3)
    p.add_argument("--qat-lr", type=float, default=0.005)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--time-limit", type=float, default=None, help="seconds: start no variant after this")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    variants = [parse_variant(v, args.results_dir) for v in args.variants]
    names = {(v["model"], v["width"]) for v in variants}
    if len(names) != 1:
        raise SystemExit(f"all variants must come from one model and width, got {sorted(names)}")
    model_name, width = names.pop()
    device = default_device()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    data = load_data(
        DataConfig(dataset=args.dataset, root=args.data, train_subset=args.train_subset, test_subset=args.test_subset)
    )
    teacher = create_model(model_name, num_classes=data.num_classes, **({"width": width} if width != 1.0 else {}))
    teacher.load_state_dict(load_checkpoint(args.teacher)[0])
    teacher.eval()
    example = torch.zeros(2, *data.image_shape)
    graph = ChannelGraph(copy.deepcopy(teacher), example)
    scores = group_scores(graph, "l1")
    teacher_dev = teacher.to(device)
    teacher_top1 = top1(predict(teacher_dev, data.test, mean=data.mean, std=data.std, batch_size=1000), data.test.y)
    rec = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "model": model_name,
        "width": width,
        "train_images": len(data.train),
        "test_images": len(data.test),
        "teacher_fp32_top1": teacher_top1,
        "rows": [],
        "skipped": [],
    }

    def save():
        rec["paired"] = paired_tests([r for r in rec["rows"] if r["seeds"]], len(data.test))
        rec["seconds"] = time.perf_counter() - t0
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec, indent=1))
        tmp.replace(args.out)

    jobs = [(s, v) for s in args.seeds for v in variants]  # every variant once before any second seed
    rows = {}
    for seed, v in jobs:
        if args.time_limit is not None and time.perf_counter() - t0 > args.time_limit:
            rec["skipped"].append(f"{v['label']} seed {seed}")
            continue
        pruned = prune_to_widths(teacher.cpu(), v["widths"], example=example, round_to=1, scores=scores)
        got = ChannelGraph(copy.deepcopy(pruned), example).widths()
        if got != v["widths"]:
            raise SystemExit(f"{v['label']}: pruned widths {got} differ from the recorded {v['widths']}")
        teacher.to(device)
        torch.manual_seed(seed)
        correct, fp32_top1, times = train_variant(pruned, teacher, data, args, seed)
        if v["label"] not in rows:
            rows[v["label"]] = {k: v[k] for k in v if k != "widths"} | {
                "widths": v["widths"],
                "params": sum(q.numel() for q in pruned.parameters()),
                "seeds": [],
            }
            rec["rows"].append(rows[v["label"]])
        k = int(correct.sum())
        rows[v["label"]]["seeds"].append(
            {
                "seed": seed,
                "int8_top1": k / len(correct),
                "int8_top1_ci95": list(wilson_interval(k, len(correct))),
                "fp32_after_ft_top1": fp32_top1,
                **{a: round(b, 1) for a, b in times.items()},
                "correct_bits": bits(correct),
            }
        )
        print(
            f"[structured_gpu] {v['label']} seed {seed}: INT8 top-1 {k / len(correct):.4f} (FP32 after fine-tune {fp32_top1:.4f}), "
            f"CPU-measured {v['cpu_ratio_to_dense']:.3f}x dense, {sum(times.values()):.0f}s",
            flush=True,
        )
        save()
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
