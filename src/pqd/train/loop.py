"""The training loop shared by the teacher and every stage.

SGD + Nesterov, cosine schedule with warm-up (:func:`pqd.train.schedule.lr_at`), no weight
decay on BN/bias, optional label smoothing, channels_last, bf16 autocast on CUDA for FP32
phases, DistributedDataParallel when launched by ``torchrun``. Pruning masks are re-applied
after every optimizer step. One atomic checkpoint per epoch; an interrupted call resumes
from it when called again with the same ``checkpoint`` path.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, MutableMapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from pqd.compress.sparsity import Masks, as_masks, masked_weight
from pqd.config import TrainConfig
from pqd.data import Splits, batches
from pqd.data.adapters import require_splits
from pqd.errors import CheckpointError
from pqd.train.checkpoint import load_checkpoint, save_checkpoint
from pqd.train.guard import DivergenceGuard
from pqd.train.schedule import lr_at
from pqd.train.tracking import Tracker

log = logging.getLogger("pqd.train")

__all__ = ["apply_masks", "cross_entropy", "default_device", "epoch_seed", "masked_weight", "process_rank", "train"]

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Zero the pruned weights: ``masks`` maps a module path to a bool mask of its weight."""
    as_masks(model, masks).apply(model)


def epoch_seed(seed: int, tag: str, epoch: int) -> int:
    """A seed per (run seed, stage, epoch), so a resumed epoch draws what the original would."""
    h = 1469598103934665603
    for ch in f"{seed}/{tag}/{epoch}".encode():
        h = ((h ^ ch) * 1099511628211) % (1 << 63)
    return h


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def process_rank() -> int:
    """This process's rank: torch.distributed's once its process group is up, else the RANK a
    launcher (torchrun) set, else 0."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return process_rank(), torch.distributed.get_world_size()
    return 0, 1


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cross_entropy(label_smoothing: float = 0.0) -> LossFn:
    def loss(logits, x, y):
        return F.cross_entropy(logits, y, label_smoothing=label_smoothing)

    return loss


def train(
    model: nn.Module,
    data: Splits,
    *,
    epochs: int,
    lr: float,
    config: TrainConfig = TrainConfig(),
    loss_fn: LossFn | None = None,
    masks: MutableMapping[str, torch.Tensor] | None = None,
    before_epoch: Callable[[int], None] | None = None,
    checkpoint: str | Path | None = None,
    seed: int = 0,
    tag: str = "train",
    amp: bool = False,
    augment: bool = True,
    tracker: Tracker | None = None,
    lr_key: str | None = None,
) -> nn.Module:
    """Train ``model`` in place for ``epochs`` epochs and return it.

    ``before_epoch(epoch)`` runs at the start of every epoch (pruning schedules, QAT
    freezing); it may update ``masks`` in place. The masks are bound to the optimizer
    (:meth:`pqd.compress.sparsity.Masks.attach`), so pruned weights are zero after every step.
    ``lr_key``: the config key of ``lr`` (e.g. 'prune.lr'), named when training diverges.
    ``amp`` enables bf16 autocast on CUDA only (use it for FP32 phases, never under fake quantization).
    ``tracker`` (:mod:`pqd.train.tracking`) receives ``<tag>.loss``, ``<tag>.train_top1``,
    ``<tag>.images_per_s`` and ``<tag>.lr`` after every epoch, with the epoch as step.
    """
    data = require_splits(data, where="pqd.train.train(model, data)")
    caller_masks = {} if masks is None else masks
    masks = as_masks(model, caller_masks)
    loss_fn = loss_fn or cross_entropy(config.label_smoothing)
    device = next(model.parameters()).device
    rank, world = _dist()
    if config.channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # Module.to takes memory_format; torch's overloads omit it
    opt = torch.optim.SGD(
        _param_groups(model, config.weight_decay), lr=lr, momentum=config.momentum, nesterov=config.nesterov
    )
    hook = masks.attach(opt)
    steps_per_epoch = max(1, len(data.train) // (config.batch_size * world))
    total = steps_per_epoch * epochs
    warmup = int(round(config.warmup_epochs * steps_per_epoch)) if epochs > 1 else 0
    names = {p: n for n, p in model.named_parameters()}

    start = 0
    ckpt = Path(checkpoint) if checkpoint else None
    if ckpt is not None and ckpt.exists():
        tensors, meta = load_checkpoint(ckpt)
        _restore(model, opt, masks, tensors, names)
        _sync(caller_masks, masks)
        try:
            start = int(meta["epoch"]) + 1
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(
                f"checkpoint {str(ckpt)!r} has malformed pqd metadata (no epoch); delete it to recompute"
            ) from None
        log.info("%s: resumed from %s after epoch %d/%d", tag, ckpt, start, epochs)

    ddp = model
    if world > 1:
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    use_amp = amp and config.amp and device.type == "cuda"
    # non-finite losses or weights stop the run with the stage, epoch and learning rate named
    guard = DivergenceGuard(tag, lr_key=lr_key, base_lr=lr)
    i, step_lr = 0, lr
    for epoch in range(start, epochs):
        s = epoch_seed(seed, tag, epoch)
        torch.manual_seed(s)
        gen = torch.Generator().manual_seed(s)
        if before_epoch is not None:
            before_epoch(epoch)
            _sync(masks, caller_masks)
        masks.apply()
        model.train()
        t0, seen, loss_sum, correct = (
            time.perf_counter(),
            0,
            torch.zeros((), device=device),
            torch.zeros((), device=device),
        )
        it = batches(
            data.train,
            batch_size=config.batch_size,
            mean=data.mean,
            std=data.std,
            shuffle=True,
            augment=augment and data.augment,
            hflip=data.hflip,
            generator=gen,
            device=device,
            crop_scale=getattr(data, "crop_scale", None),
            channels_last=config.channels_last,
            drop_last=True,
            rank=rank,
            world_size=world,
        )
        bar = tqdm(
            it,
            total=steps_per_epoch,
            desc=f"{tag} {epoch + 1}/{epochs}",
            leave=False,
            disable=not config.progress or rank != 0 or None,
        )
        for i, (x, y) in enumerate(bar):
            step_lr = lr_at(epoch * steps_per_epoch + i, total_steps=total, base_lr=lr, warmup_steps=warmup)
            for g in opt.param_groups:
                g["lr"] = step_lr
            try:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    logits = ddp(x)
                    loss = loss_fn(logits.float(), x, y)
                guard.step(loss, epoch=epoch, step=i, lr=step_lr)
                opt.zero_grad(set_to_none=True)
                loss.backward()
            except RuntimeError as exc:  # e.g. "zero_point must be between quant_min and quant_max" from NaN weights
                explained = guard.explain(exc, model, epoch=epoch, step=i, lr=step_lr)
                if explained is None:
                    raise
                raise explained from exc
            opt.step()  # the masks' step hook zeroes the pruned weights again
            loss_sum += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
            if i % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{step_lr:.4f}")
        guard.end_epoch(model, epoch=epoch, step=i, lr=step_lr)  # before the checkpoint: never save a NaN model
        dt = time.perf_counter() - t0
        epoch_loss, epoch_acc, speed = (
            (loss_sum / max(seen, 1)).item(),
            (correct / max(seen, 1)).item(),
            seen * world / dt,
        )
        log.info(
            "%s epoch %d/%d: loss %.4f, train acc %.2f%%, %.0f img/s",
            tag,
            epoch + 1,
            epochs,
            epoch_loss,
            100 * epoch_acc,
            speed,
        )
        if tracker is not None and rank == 0:
            tracker.log_metrics(
                {
                    f"{tag}.loss": epoch_loss,
                    f"{tag}.train_top1": epoch_acc,
                    f"{tag}.images_per_s": speed,
                    f"{tag}.lr": opt.param_groups[0]["lr"],
                },
                step=epoch,
            )
        if world > 1:  # DDP syncs buffers at each forward; make BN statistics identical after the last one
            for b in model.buffers():
                torch.distributed.broadcast(b, 0)
        if ckpt is not None and rank == 0:
            save_checkpoint(ckpt, _snapshot(model, opt, masks, names), {"epoch": epoch, "tag": tag})
        if world > 1:
            torch.distributed.barrier()
    hook.remove()
    if config.channels_last:
        model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]  # Module.to takes memory_format; torch's overloads omit it
    return model


def _sync(dst: MutableMapping[str, torch.Tensor], src: Mapping[str, torch.Tensor]) -> None:
    """Make ``dst`` hold ``src``'s masks (no-op when they are the same object)."""
    if dst is not src:
        dst.clear()
        dst.update(src)


def _snapshot(model: nn.Module, opt: torch.optim.Optimizer, masks: Masks, names: dict) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v for k, v in model.state_dict().items()}
    for p, st in opt.state.items():
        if "momentum_buffer" in st and st["momentum_buffer"] is not None:
            out[f"optim.{names[p]}"] = st["momentum_buffer"]
    out.update({f"mask.{k}": v for k, v in masks.items()})
    return out


def _restore(model, opt, masks, tensors, names) -> None:
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    by_name = {n: p for p, n in names.items()}
    for k, v in tensors.items():
        if k.startswith("optim."):
            p = by_name[k[6:]]
            opt.state[p]["momentum_buffer"] = v.to(p.device)
    masks.clear()
    masks.update({k[5:]: v for k, v in tensors.items() if k.startswith("mask.")})
