"""Global unstructured pruning: magnitude (or random, as a baseline), one-shot or gradual
with the cubic schedule of Zhu & Gupta (2017, "AGP")."""

from __future__ import annotations

import fnmatch
import logging
from pathlib import Path

import torch
from torch import nn

from pqd.config import PruneConfig, TrainConfig
from pqd.data import Splits
from pqd.errors import ConfigError, ModelError
from pqd.stages.common import Student, chain
from pqd.stages.quantize import freeze, qat_epoch_hook
from pqd.train.loop import apply_masks, epoch_seed, masked_weight, train

log = logging.getLogger("pqd.prune")

_PRUNABLE = (nn.modules.conv._ConvNd, nn.Linear)


def prunable_layers(model: nn.Module, exclude: tuple[str, ...] = ()) -> list[str]:
    """Module paths of conv/linear layers (QAT variants included), minus ``exclude``.

    ``exclude`` holds glob patterns on module paths; '@first' and '@last' name the first
    and the last such layer in definition order.
    """
    paths = [n for n, m in model.named_modules() if isinstance(m, _PRUNABLE) and isinstance(getattr(m, "weight", None), torch.Tensor)]
    if not paths:
        raise ModelError(f"{type(model).__name__} has no Conv/Linear layers to prune")
    drop = set()
    for pat in exclude:
        if pat == "@first":
            drop.add(paths[0])
        elif pat == "@last":
            drop.add(paths[-1])
        else:
            hits = fnmatch.filter(paths, pat)
            if not hits:
                raise ConfigError(f"prune.exclude: pattern {pat!r} matches no prunable layer; layers are: {', '.join(paths)}")
            drop.update(hits)
    kept = [p for p in paths if p not in drop]
    if not kept:
        raise ConfigError("prune.exclude: every prunable layer is excluded; nothing is left to prune")
    return kept


def sparsity_at(epoch: int, *, epochs: int, target: float, schedule: str = "gradual", prune_fraction: float = 0.75) -> float:
    """Target sparsity in force during ``epoch`` (0-based). Gradual: cubic ramp reaching
    ``target`` after ``prune_fraction`` of the epochs, then fixed for fine-tuning."""
    if schedule == "oneshot" or epochs <= 1:
        return target
    n = max(1, round(epochs * prune_fraction))
    t = min(epoch + 1, n) / n
    return target * (1.0 - (1.0 - t) ** 3)


def compute_masks(
    model: nn.Module, layers: list[str], sparsity: float, *, criterion: str = "magnitude",
    old: dict[str, torch.Tensor] | None = None, generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """One global threshold over all ``layers``: the ``sparsity`` fraction of lowest-scoring
    weights is pruned. Weights pruned before (``old``) stay pruned."""
    scores = []
    for path in layers:
        w = masked_weight(model, path).detach()
        s = w.abs().float().cpu() if criterion == "magnitude" else torch.rand(w.shape, generator=generator)
        if old and path in old:
            s = torch.where(old[path].cpu(), s, torch.full_like(s, -1.0))
        scores.append(s.flatten())
    flat = torch.cat(scores)
    n_prune = int(round(sparsity * flat.numel()))
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    if n_prune > 0:
        keep[torch.topk(flat, n_prune, largest=False, sorted=False).indices] = False
    masks, offset = {}, 0
    for path, s in zip(layers, scores):
        w = masked_weight(model, path)
        masks[path] = keep[offset : offset + s.numel()].view(w.shape).to(w.device)
        offset += s.numel()
    return masks


def global_sparsity(model: nn.Module, layers: list[str]) -> float:
    """Fraction of exactly-zero weights over ``layers`` (measured on the weights themselves)."""
    zeros = total = 0
    for path in layers:
        w = masked_weight(model, path).detach()
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros / max(total, 1)


def prune(
    student: Student, config: PruneConfig, *, data: Splits, epochs: int, train_config: TrainConfig = TrainConfig(),
    checkpoint: str | Path | None = None, seed: int = 0, augment: bool = True,
) -> Student:
    """Prune ``student`` to ``config.sparsity`` (global, unstructured) while fine-tuning for
    ``epochs``. Works in any form (FP32 or fake-quant); returns the student with masks."""
    model, masks = student.model, dict(student.masks)
    layers = prunable_layers(model, config.exclude)

    def before_epoch(epoch: int) -> None:
        target = sparsity_at(epoch, epochs=epochs, target=config.sparsity, schedule=config.schedule, prune_fraction=config.prune_fraction)
        gen = torch.Generator().manual_seed(epoch_seed(seed, "prune-random", epoch))
        masks.update(compute_masks(model, layers, target, criterion=config.criterion, old=masks, generator=gen))
        log.info("prune epoch %d: target sparsity %.4f", epoch + 1, target)

    if epochs == 0:
        before_epoch(0)
        apply_masks(model, masks)
    else:
        train(model, data, epochs=epochs, lr=config.lr, config=train_config, masks=masks,
              before_epoch=chain(qat_epoch_hook(student, epochs), before_epoch),
              checkpoint=checkpoint, seed=seed, tag="prune", amp=not student.quantized, augment=augment)
    if student.quantized:
        freeze(model)
    return Student(model, masks, student.form, student.freeze_fraction)
