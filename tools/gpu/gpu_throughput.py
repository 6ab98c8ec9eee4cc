"""Training throughput of pqd's loop against the bare-step ceiling, phase by phase, in one run.

    PYTHONPATH=src python tools/gpu/gpu_throughput.py                       # a GPU, random CIFAR-shaped data
    PYTHONPATH=src python tools/gpu/gpu_throughput.py --data-root ../shared/data/cifar10-jpeg.tar.gz
    PYTHONPATH=src python tools/gpu/gpu_throughput.py --quick --device cpu  # tiny model, a few steps (the test)

Phases (ResNet-18, batch 512 by default, each timed over whole epochs after a warm-up epoch):

* ``fp32_bf16``: FP32 weights, bf16 autocast (what the teacher and FP32 stages use on CUDA);
  also with the host data path (``$PQD_DEVICE_DATA_MB=0``) to show what device-resident data gives.
* ``fp32_tf32``: FP32 without autocast, TF32 matmuls and convolutions.
* ``prune``: the prune stage's loop at 90% global sparsity: masks recomputed every epoch (gradual
  schedule, as :func:`pqd.stages.prune` does) and re-applied after every step.
* ``qat``: FX fake-quant student (with the prune masks), as the quantize stage trains it.
* ``qat_kd``: the same student distilled from the FP32 teacher, as the distill stage trains it.

Ceiling = a bare step with the batch already on the device and nothing else in it (forward, loss,
backward, SGD step). For the prune phase the breakdown also times the bare step plus today's
per-step mask application, plus a cached multi-tensor (``_foreach_mul_``) mask, and one
``compute_masks`` call (CPU top-k) against the same threshold found on the device. For QAT the
ceiling is also timed with TF32 and under bf16 autocast, and the INT8 agreement of a bf16-autocast
QAT run with an FP32 one is measured against the FP32 run-to-run floor (same start, same batches).

Writes ``--out-dir``/gpu_throughput.json and .md (default benchmarks/results). Timings on CPU
(``--quick``) only test the script; the figures that matter come from a GPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pqd.compress.kd import kd_loss
from pqd.compress.qat import freeze, prepare
from pqd.compress.student import Student, convert_student, qat_epoch_hook
from pqd.config import DataConfig, TrainConfig
from pqd.data import DEVICE_DATA_ENV, Dataset, Splits, batches, load_data, resident_default
from pqd.measure import agreement, predict, top1
from pqd.models.registry import create_model
from pqd.stages.prune import compute_masks, prunable_layers, sparsity_at
from pqd.train import train
from pqd.train.loop import apply_masks, masked_weight

SCHEMA = 1
PHASES = ("fp32_bf16", "fp32_tf32", "prune", "qat", "qat_kd")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="tiny model and data, a few steps: checks the script, measures nothing"
    )
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--width", type=float, default=None, help="default 1.0 (0.125 with --quick)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 512 (32 with --quick)")
    ap.add_argument("--images", type=int, default=None, help="random training images (default 50000; 32 with --quick)")
    ap.add_argument("--image-size", type=int, default=None, help="random images' side (default 32; 16 with --quick)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; 1 with --quick)")
    ap.add_argument(
        "--data-root", default=None, help="real data: a CIFAR archive / folder; random CIFAR-shaped data if unset"
    )
    ap.add_argument("--dataset", default="cifar10", help="with --data-root: cifar10, cifar100 or folder")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument(
        "--epochs", type=int, default=None, help="loop epochs per phase, the first untimed (default 3; 2 with --quick)"
    )
    ap.add_argument("--steps", type=int, default=None, help="timed bare steps per ceiling (default 50; 3 with --quick)")
    ap.add_argument("--warmup-steps", type=int, default=None, help="default 10 (1 with --quick)")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument(
        "--agree-steps", type=int, default=None, help="QAT steps per run for the bf16 agreement (default 200; 4 quick)"
    )
    ap.add_argument(
        "--agree-images",
        type=int,
        default=None,
        help="test images the agreement is counted on (default 10000; 64 quick)",
    )
    ap.add_argument("--skip-agreement", action="store_true")
    ap.add_argument(
        "--compile",
        action="store_true",
        help="also time torch.compile'd bare steps (FP32 bf16 and QAT); costs about a minute of compilation each",
    )
    ap.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    a = ap.parse_args(argv)
    q = a.quick
    for name, full, quick in (
        ("width", 1.0, 0.125),
        ("batch_size", 512, 16),
        ("images", 50000, 32),
        ("image_size", 32, 16),
        ("epochs", 3, 2),
        ("steps", 50, 1),
        ("warmup_steps", 10, 1),
        ("agree_steps", 200, 2),
        ("agree_images", 10000, 32),
        ("threads", None, 1),
    ):
        if getattr(a, name) is None:
            setattr(a, name, quick if q else full)
    if a.epochs < 2:
        ap.error("--epochs must be >= 2 (the first epoch is a warm-up)")
    return a


# --------------------------------------------------------------------------------------------- helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def tf32(enabled: bool):
    """TF32 for matmuls and cuDNN convolutions (restored afterwards)."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@contextmanager
def fake_quant_in_fp32():
    """Idea under test: under bf16 autocast, hand the fake-quant ops FP32 input. The fused op has no
    bf16 kernel (a Linear's bf16 output fails), convolutions still run in bf16; BN runs in FP32."""
    from torch.ao.quantization.fake_quantize import FusedMovingAvgObsFakeQuantize as FQ

    orig = FQ.forward

    def forward(self, X):
        return orig(self, X.float())

    FQ.forward = forward
    try:
        yield
    finally:
        FQ.forward = orig


@contextmanager
def env(name: str, value: str | None):
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def sgd(model: nn.Module, lr: float, cfg: TrainConfig) -> torch.optim.SGD:
    """The loop's optimizer: SGD + Nesterov, no weight decay on BN / biases."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


def ce(logits, x, y):
    return F.cross_entropy(logits, y)


def kd(teacher: nn.Module) -> Callable:
    def loss(logits, x, y):
        with torch.no_grad():
            t = teacher(x).float()
        return kd_loss(logits, t, y, temperature=4.0, alpha=0.5)

    return loss


def time_loop(
    model: nn.Module,
    data: Splits,
    cfg: TrainConfig,
    *,
    epochs: int,
    lr: float,
    amp: bool,
    device: torch.device,
    loss_fn=None,
    masks=None,
    hook=None,
) -> dict[str, Any]:
    """pqd's training loop over ``epochs`` epochs; images/s over all but the first (a warm-up)."""
    marks: list[float] = []

    def before_epoch(epoch: int) -> None:
        sync(device)
        marks.append(time.perf_counter())
        if hook is not None:
            hook(epoch)

    train(
        model,
        data,
        epochs=epochs,
        lr=lr,
        config=cfg,
        loss_fn=loss_fn,
        masks=masks,
        before_epoch=before_epoch,
        seed=0,
        tag="bench",
        amp=amp,
        augment=True,
    )
    sync(device)
    marks.append(time.perf_counter())
    per_epoch = (len(data.train) // cfg.batch_size) * cfg.batch_size
    epoch_s = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    timed = epoch_s[1:]
    return {
        "images_per_s": per_epoch * len(timed) / sum(timed),
        "epoch_s": [round(t, 4) for t in epoch_s],
        "images_per_epoch": per_epoch,
    }


def time_steps(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    loss_fn,
    amp: bool,
    steps: int,
    warmup: int,
    device: torch.device,
    cfg: TrainConfig,
    after_step: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Bare steps on one batch already on the device: forward, loss, backward, SGD step (+ ``after_step``)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        model.to(memory_format=torch.channels_last)  # as the loop does (it hands the model back contiguous)
    opt = sgd(model, 1e-3, cfg)
    model.train()
    try:
        for i in range(warmup + steps):
            if i == warmup:
                sync(device)
                t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(x)
                loss = loss_fn(logits.float(), x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if after_step is not None:
                after_step()
        sync(device)
    except Exception as exc:  # e.g. an op without a bf16 kernel under autocast
        return {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    dt = time.perf_counter() - t0
    return {"images_per_s": len(y) * steps / dt, "step_ms": 1000 * dt / steps}


def foreach_masker(model: nn.Module, masks: dict[str, torch.Tensor]) -> Callable[[], None]:
    """Idea under test: float masks cached on the device once, applied by one multi-tensor multiply."""
    weights = [masked_weight(model, p) for p in masks]
    cached = [m.to(device=w.device, dtype=w.dtype) for m, w in zip(masks.values(), weights, strict=True)]

    def apply() -> None:
        with torch.no_grad():
            torch._foreach_mul_(weights, cached)

    return apply


def device_threshold_masks(model: nn.Module, layers: list[str], sparsity: float) -> dict[str, torch.Tensor]:
    """Idea under test: the global magnitude threshold found on the device (no copy to the CPU)."""
    ws = [masked_weight(model, p).detach() for p in layers]
    flat = torch.cat([w.abs().float().flatten() for w in ws])
    k = int(round(sparsity * flat.numel()))
    if k == 0:
        return {p: torch.ones_like(w, dtype=torch.bool) for p, w in zip(layers, ws, strict=True)}
    thr = torch.kthvalue(flat, k).values
    return {p: w.abs().float() > thr for p, w in zip(layers, ws, strict=True)}


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t


def fraction(loop: dict, ceiling: dict) -> float | None:
    if "images_per_s" not in loop or "images_per_s" not in ceiling:
        return None
    return round(loop["images_per_s"] / ceiling["images_per_s"], 4)


# --------------------------------------------------------------------------------------------- data


def make_data(a: argparse.Namespace) -> Splits:
    if a.data_root:
        return load_data(DataConfig(dataset=a.dataset, root=a.data_root, cache_dir=a.cache_dir))
    g = torch.Generator().manual_seed(0)
    n_test, side = a.agree_images, a.image_size

    def ds(n):
        return Dataset(
            torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=g),
            torch.randint(0, 10, (n,), generator=g),
            tuple(map(str, range(10))),
        )

    return Splits(
        name="random", train=ds(a.images), val=None, test=ds(n_test), mean=(0.5,) * 3, std=(0.25,) * 3, hflip=True
    )


# --------------------------------------------------------------------------------------------- the run


def run(a: argparse.Namespace) -> dict[str, Any]:
    warnings.filterwarnings("ignore")
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    data = make_data(a)
    cfg = TrainConfig(batch_size=a.batch_size, progress=False)
    nc = data.num_classes
    kw = {"width": a.width} if a.width != 1.0 else {}
    model = create_model(a.model, num_classes=nc, **kw).to(device)
    cuda = device.type == "cuda"
    res: dict[str, Any] = {
        "schema": SCHEMA,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "quick": a.quick,
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "model": {"name": a.model, "width": a.width, "num_classes": nc},
        "data": data.name if a.data_root else f"random uint8 {len(data.train)}x3x{a.image_size}x{a.image_size}",
        "threads": torch.get_num_threads(),
        "batch_size": a.batch_size,
        "epochs_per_loop": a.epochs,
        "ceiling_steps": a.steps,
        "device_resident_data": resident_default(data.train, device),
        "phases": {},
    }
    P = res["phases"]
    xb, yb = next(
        iter(
            batches(
                data.train,
                batch_size=a.batch_size,
                mean=data.mean,
                std=data.std,
                shuffle=True,
                augment=True,
                generator=torch.Generator().manual_seed(0),
                device=device,
                channels_last=cfg.channels_last,
                drop_last=True,
            )
        )
    )
    model.to(memory_format=torch.channels_last)
    steps = dict(steps=a.steps, warmup=a.warmup_steps, device=device, cfg=cfg)

    def report(name):
        p = P[name]
        p["fraction_of_ceiling"] = fraction(p["loop"], p["ceiling"])
        print(
            f"{name:<10} loop {p['loop'].get('images_per_s', float('nan')):9.0f} img/s   "
            f"ceiling {p['ceiling'].get('images_per_s', float('nan')):9.0f} img/s   {p['fraction_of_ceiling']}",
            flush=True,
        )
        write(res | {"partial": True, "optimisation_ideas": IDEAS}, a.out_dir)  # a run cut off keeps what it measured

    # FP32 phase, bf16 autocast (the loop autocasts on CUDA only)
    P["fp32_bf16"] = {"loop_autocast": cuda and cfg.amp}
    P["fp32_bf16"]["ceiling"] = time_steps(copy.deepcopy(model), xb, yb, loss_fn=ce, amp=cuda, **steps)
    P["fp32_bf16"]["loop"] = time_loop(model, data, cfg, epochs=a.epochs, lr=0.05, amp=True, device=device)
    if cuda:
        with env(DEVICE_DATA_ENV, "0"):
            P["fp32_bf16"]["loop_host_data"] = time_loop(
                copy.deepcopy(model), data, cfg, epochs=a.epochs, lr=0.05, amp=True, device=device
            )
    if a.compile:
        P["fp32_bf16"]["ceiling_compiled"] = time_steps(
            torch.compile(copy.deepcopy(model)), xb, yb, loss_fn=ce, amp=cuda, **steps
        )
    report("fp32_bf16")
    teacher = copy.deepcopy(model).eval()

    # FP32 phase, TF32
    with tf32(True):
        P["fp32_tf32"] = {
            "ceiling": time_steps(copy.deepcopy(model), xb, yb, loss_fn=ce, amp=False, **steps),
            "loop": time_loop(copy.deepcopy(model), data, cfg, epochs=a.epochs, lr=0.05, amp=False, device=device),
        }
    report("fp32_tf32")

    # prune phase: where the time goes
    layers = prunable_layers(model, ("@first",))
    masks: dict[str, torch.Tensor] = {}
    mask_s: list[float] = []

    def prune_hook(epoch: int) -> None:  # what pqd.stages.prune does before each epoch
        target = sparsity_at(epoch, epochs=a.epochs, target=a.sparsity)
        new, dt = timed(lambda: compute_masks(model, layers, target, old=masks), device)
        masks.update(new)
        mask_s.append(round(dt, 4))

    pr: dict[str, Any] = {"sparsity": a.sparsity, "schedule": "gradual"}
    P["prune"] = pr
    pr["loop"] = time_loop(
        model, data, cfg, epochs=a.epochs, lr=0.01, amp=True, device=device, masks=masks, hook=prune_hook
    )
    pr["loop"]["compute_masks_s_per_epoch"] = mask_s
    bare = time_steps(copy.deepcopy(model), xb, yb, loss_fn=ce, amp=cuda, **steps)
    pr["ceiling"] = bare
    m1 = copy.deepcopy(model)
    m2 = copy.deepcopy(model)
    pr["breakdown"] = {
        "bare_step": bare,
        "bare_step+apply_masks (today, per step)": time_steps(
            m1, xb, yb, loss_fn=ce, amp=cuda, after_step=lambda: apply_masks(m1, masks), **steps
        ),
        "bare_step+foreach_mul cached masks (idea)": time_steps(
            m2, xb, yb, loss_fn=ce, amp=cuda, after_step=foreach_masker(m2, masks), **steps
        ),
    }
    _, t_cpu = timed(lambda: compute_masks(model, layers, a.sparsity, old=masks), device)
    dev_masks, t_dev = timed(lambda: device_threshold_masks(model, layers, a.sparsity), device)
    same = sum(int((dev_masks[p] == masks[p].to(dev_masks[p].device)).sum()) for p in layers)
    total = sum(masks[p].numel() for p in layers)
    pr["compute_masks"] = {
        "pqd_cpu_topk_s": round(t_cpu, 4),
        "device_kthvalue_s (idea)": round(t_dev, 4),
        "device_masks_equal_fraction": same / total,
    }
    report("prune")

    # QAT phase (the pruned student, as the quantize stage trains it)
    example = torch.zeros(2, *data.image_shape)
    qat_model = prepare(copy.deepcopy(model).to(memory_format=torch.contiguous_format).cpu(), example, mode="qat")
    qat_model.to(device)
    apply_masks(qat_model, masks)
    qat_start = copy.deepcopy(qat_model)
    student = Student(qat_model, dict(masks), "qat", 0.25)
    q: dict[str, Any] = {
        "tf32_default": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}
    }
    P["qat"] = q
    q["ceiling"] = time_steps(
        copy.deepcopy(qat_start).to(memory_format=torch.channels_last), xb, yb, loss_fn=ce, amp=False, **steps
    )
    with tf32(True):
        q["ceiling_tf32"] = time_steps(
            copy.deepcopy(qat_start).to(memory_format=torch.channels_last), xb, yb, loss_fn=ce, amp=False, **steps
        )
    q["ceiling_bf16_autocast"] = time_steps(
        copy.deepcopy(qat_start).to(memory_format=torch.channels_last), xb, yb, loss_fn=ce, amp=True, **steps
    )
    with fake_quant_in_fp32():
        q["ceiling_bf16_autocast_fp32_fake_quant"] = time_steps(
            copy.deepcopy(qat_start).to(memory_format=torch.channels_last), xb, yb, loss_fn=ce, amp=True, **steps
        )
    q["ceiling_contiguous_format"] = time_steps(
        copy.deepcopy(qat_start), xb.contiguous(), yb, loss_fn=ce, amp=False, **steps
    )
    if a.compile:
        q["ceiling_compiled"] = time_steps(
            torch.compile(copy.deepcopy(qat_start).to(memory_format=torch.channels_last)),
            xb,
            yb,
            loss_fn=ce,
            amp=False,
            **steps,
        )
    q["loop"] = time_loop(
        qat_model,
        data,
        cfg,
        epochs=a.epochs,
        lr=0.005,
        amp=False,
        device=device,
        masks=student.masks,
        hook=qat_epoch_hook(student, a.epochs),
    )
    report("qat")

    # QAT + KD (the distill stage on the QAT student)
    teacher.to(memory_format=torch.channels_last)
    unfrozen = copy.deepcopy(qat_start)
    P["qat_kd"] = {
        "ceiling": time_steps(
            unfrozen.to(memory_format=torch.channels_last), xb, yb, loss_fn=kd(teacher), amp=False, **steps
        ),
        "loop": time_loop(
            qat_model,
            data,
            cfg,
            epochs=a.epochs,
            lr=0.005,
            amp=False,
            device=device,
            loss_fn=kd(teacher),
            masks=student.masks,
            hook=qat_epoch_hook(student, a.epochs),
        ),
    }
    report("qat_kd")

    if not a.skip_agreement:
        res["qat_bf16_int8_agreement"] = bf16_agreement(qat_start, masks, data, a, device, cfg)
        print("bf16 QAT agreement:", json.dumps(res["qat_bf16_int8_agreement"]), flush=True)
    res["optimisation_ideas"] = IDEAS
    res["partial"] = False
    return res


def bf16_agreement(start: nn.Module, masks, data: Splits, a, device, cfg) -> dict[str, Any]:
    """Train the same QAT start for the same batches in FP32 (twice: the run-to-run floor) and
    under bf16 autocast (fake-quant ops fed FP32, see :func:`fake_quant_in_fp32`); convert each to
    INT8 (CPU) and compare their test predictions."""

    def qat_run(amp: bool) -> nn.Module:
        m = copy.deepcopy(start).to(memory_format=torch.channels_last)
        opt = sgd(m, 0.005, cfg)
        g = torch.Generator().manual_seed(123)
        m.train()
        done = 0
        while done < a.agree_steps:
            for x, y in batches(
                data.train,
                batch_size=a.batch_size,
                mean=data.mean,
                std=data.std,
                shuffle=True,
                augment=True,
                generator=g,
                device=device,
                channels_last=True,
                drop_last=True,
            ):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    loss = F.cross_entropy(m(x).float(), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                apply_masks(m, masks)
                done += 1
                if done >= a.agree_steps:
                    break
        freeze(m)
        return m.to(memory_format=torch.contiguous_format)

    test = data.test.subset(torch.arange(min(a.agree_images, len(data.test))))
    out: dict[str, Any] = {"steps": a.agree_steps, "test_images": len(test), "data": data.name}
    logits = {}
    for name, amp in (("fp32", False), ("fp32_rerun", False), ("bf16", True)):
        try:
            if amp:
                with fake_quant_in_fp32():
                    m = qat_run(amp)
            else:
                m = qat_run(amp)
        except Exception as exc:
            out[f"{name}_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            continue
        cpu_masks = {k: v.cpu() for k, v in masks.items()}
        int8 = convert_student(Student(m.cpu(), cpu_masks, "qat"))
        logits[name] = predict(int8, test, mean=data.mean, std=data.std, batch_size=500)
        out[f"{name}_int8_top1"] = top1(logits[name], test.y)
    if "fp32" in logits and "fp32_rerun" in logits:
        out["int8_agreement_fp32_vs_fp32_rerun"] = agreement(logits["fp32"], logits["fp32_rerun"])
    if "fp32" in logits and "bf16" in logits:
        out["int8_agreement_bf16_vs_fp32"] = agreement(logits["bf16"], logits["fp32"])
    return out


IDEAS = [
    "prune: recompute masks on the device (one kthvalue / topk over the flattened |w| on the GPU) instead of copying every "
    "weight to the CPU and running a CPU top-k each epoch; compare prune.compute_masks.pqd_cpu_topk_s with "
    "'device_kthvalue_s (idea)' and loop.compute_masks_s_per_epoch with the loop's epoch_s (ties at the threshold may differ).",
    "prune: cache the float masks on the device once per epoch (apply_masks converts bool->float for every layer at every "
    "step) and apply them with one torch._foreach_mul_; compare the three breakdown rows.",
    "prune/QAT: or mask the gradients and momentum instead of the weights after the step (weights already zero stay zero "
    "with masked grads and decoupled weight decay), removing the per-step weight pass altogether.",
    "all phases: the loop syncs on loss.item() every 10 steps and accumulates accuracy with small kernels; keep the "
    "accumulation on the device and log once per epoch.",
    "QAT: plain bf16 autocast fails (torch.fused_moving_avg_obs_fake_quant has no bf16 kernel; a Linear's bf16 output "
    "reaches it). Feeding the fake-quant ops FP32 (ceiling_bf16_autocast_fp32_fake_quant) keeps convolutions in bf16; "
    "if that ceiling beats ceiling_tf32 and int8_agreement_bf16_vs_fp32 is within the fp32-vs-fp32-rerun floor, let the "
    "QAT loop autocast with that cast.",
    "QAT: torch.compile the prepared GraphModule (fuses the fake-quant elementwise ops with the BN-folding rescale); "
    "or CUDA graphs for the whole step at a fixed batch shape (drop_last already fixes it).",
    "QAT+KD: the teacher forward runs in FP32 under the QAT phase (no autocast); run it under bf16 autocast "
    "(its logits are only soft targets) and channels_last.",
]


def write(res: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    j, m = out_dir / "gpu_throughput.json", out_dir / "gpu_throughput.md"
    j.write_text(json.dumps(res, indent=2))
    m.write_text(to_markdown(res))
    return j, m


def _ips(d: dict) -> str:
    return f"{d['images_per_s']:,.0f}" if "images_per_s" in d else f"error: {d.get('error', '?')}"


def to_markdown(res: dict[str, Any]) -> str:
    lines = [
        "# Training throughput: pqd's loop vs the bare-step ceiling",
        "",
        f"Command: `{res['command']}`  ",
        f"Device: {res['device']}, torch {res['torch']} (CUDA {res['cuda']}); model {res['model']['name']} width "
        f"{res['model']['width']}, batch {res['batch_size']}, data: {res['data']}, device-resident data: "
        f"{res['device_resident_data']}"
        + ("  \n**--quick: a smoke run, the numbers mean nothing.**" if res["quick"] else ""),
        "",
        "| phase | loop images/s | ceiling images/s | loop / ceiling |",
        "| --- | ---: | ---: | ---: |",
    ]
    if res.get("partial"):
        lines.insert(5, "**Partial: the run stopped before every phase was measured.**  ")
    for name in (n for n in PHASES if n in res["phases"]):
        p = res["phases"][name]
        frac = p.get("fraction_of_ceiling")
        lines.append(
            f"| {name} | {_ips(p['loop'])} | {_ips(p['ceiling'])} | {'' if frac is None else f'{100 * frac:.1f}%'} |"
        )
    f = res["phases"].get("fp32_bf16", {})
    if "loop_host_data" in f:
        lines += ["", f"FP32 (bf16) loop with the host data path: {_ips(f['loop_host_data'])} images/s."]
    if "prune" not in res["phases"]:
        return "\n".join(lines) + "\n"
    pr = res["phases"]["prune"]
    lines += ["", "## Prune phase", "", "| step | images/s |", "| --- | ---: |"]
    lines += [f"| {k} | {_ips(v)} |" for k, v in pr["breakdown"].items()]
    cm = pr["compute_masks"]
    lines += [
        "",
        f"compute_masks per epoch in the loop (s): {pr['loop'].get('compute_masks_s_per_epoch')}; loop epoch times (s): "
        f"{pr['loop'].get('epoch_s')}.  ",
        f"One compute_masks call: pqd (CPU top-k) {cm['pqd_cpu_topk_s']} s, on the device (kthvalue) "
        f"{cm['device_kthvalue_s (idea)']} s; masks equal on {100 * cm['device_masks_equal_fraction']:.4f}% of weights.",
    ]
    q = res["phases"].get("qat")
    if q is None:
        return "\n".join(lines) + "\n"
    lines += ["", "## QAT ceilings", "", "| variant | images/s |", "| --- | ---: |"]
    lines += [
        f"| {k} | {_ips(q[k])} |"
        for k in (
            "ceiling",
            "ceiling_tf32",
            "ceiling_bf16_autocast",
            "ceiling_bf16_autocast_fp32_fake_quant",
            "ceiling_contiguous_format",
            "ceiling_compiled",
        )
        if k in q
    ]
    if "ceiling_compiled" in f:
        lines += ["", f"FP32 (bf16) bare step under torch.compile: {_ips(f['ceiling_compiled'])} images/s."]
    ag = res.get("qat_bf16_int8_agreement")
    if ag:
        lines += ["", "## bf16 QAT: INT8 agreement", "", "```", json.dumps(ag, indent=2), "```"]
    lines += ["", "## Optimisation ideas to measure", ""] + [f"- {i}" for i in res["optimisation_ideas"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    res = run(a)
    j, m = write(res, a.out_dir)
    print(f"wrote {j} and {m}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
