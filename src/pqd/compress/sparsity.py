"""Unstructured sparsity primitives that work in any training loop.

* :class:`Masks` holds one bool mask per weight (keyed by module path) and keeps the pruned
  weights at zero: ``masks.apply()`` once, or ``masks.attach(optimizer)`` to re-apply them
  after every ``optimizer.step()`` (an optimizer step post-hook, so any loop, Lightning
  included, honours them without calling pqd).
* Importance criteria are objects: :class:`MagnitudeImportance`, :class:`RandomImportance`.
* Schedules are pure functions of the step: :func:`agp_sparsity` (cubic, Zhu & Gupta 2017),
  :func:`oneshot_sparsity`, and :func:`sparsity_at` (pqd's per-epoch form of AGP).
* :class:`GlobalPruner` ranks the weights of all chosen layers together (one global threshold)
  and grows the masks monotonically: ``pruner.update(sparsity)`` or ``pruner.step()``.

Nothing here reads or writes files or run configs.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from pqd.errors import ConfigError, ModelError

__all__ = [
    "GlobalPruner",
    "Importance",
    "MagnitudeImportance",
    "Masks",
    "RandomImportance",
    "agp_sparsity",
    "global_sparsity",
    "masked_weight",
    "oneshot_sparsity",
    "prunable_layers",
    "sparsity_at",
]

_PRUNABLE = (nn.modules.conv._ConvNd, nn.Linear)


# --------------------------------------------------------------------------- layers

DEFAULT_EXCLUDE = ("@first",)  # layers left dense unless configured: the first conv sees raw pixels


def masked_weight(model: nn.Module, path: str) -> torch.Tensor:
    """The weight tensor of the module at ``path``. PTQ's eval-mode fusion replaces Conv+BN+ReLU
    by a fused wrapper (e.g. ``ConvReLU2d``) at the conv's path; its weight is in its first child."""
    m = model.get_submodule(path)
    w = getattr(m, "weight", None)
    if w is None and isinstance(m, nn.Sequential) and len(m):
        w = getattr(m[0], "weight", None)
    if not isinstance(w, torch.Tensor):
        raise AttributeError(f"module {path!r} ({type(m).__name__}) has no weight tensor")
    return w


def prunable_layers(model: nn.Module, exclude: tuple[str, ...] = ()) -> list[str]:
    """Module paths of conv/linear layers (QAT variants included), minus ``exclude``.

    ``exclude`` holds glob patterns on module paths; '@first' and '@last' name the first
    and the last such layer in definition order.
    """
    paths = [
        n
        for n, m in model.named_modules()
        if isinstance(m, _PRUNABLE) and isinstance(getattr(m, "weight", None), torch.Tensor)
    ]
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
                raise ConfigError(
                    f"prune.exclude: pattern {pat!r} matches no prunable layer; layers are: {', '.join(paths)}"
                )
            drop.update(hits)
    kept = [p for p in paths if p not in drop]
    if not kept:
        raise ConfigError("prune.exclude: every prunable layer is excluded; nothing is left to prune")
    return kept


def global_sparsity(model: nn.Module, layers: list[str]) -> float:
    """Fraction of exactly-zero weights over ``layers`` (measured on the weights themselves)."""
    zeros = total = 0
    for path in layers:
        w = masked_weight(model, path).detach()
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros / max(total, 1)


# --------------------------------------------------------------------------- masks


class Masks(MutableMapping[str, torch.Tensor]):
    """Bool masks of the weights of ``model``, keyed by module path (``True`` = kept).

    A mapping ``path -> bool tensor``; ``dict(masks)`` is what :class:`pqd.stages.Student`
    stores. ``apply()`` zeroes the pruned weights of the bound model (or of another model with
    the same module paths, e.g. a QAT-prepared copy); ``attach(optimizer)`` re-applies them
    after every optimizer step and returns a handle whose ``remove()`` detaches them.
    """

    def __init__(self, model: nn.Module, masks: Mapping[str, torch.Tensor] | None = None):
        self.model = model
        self._masks: dict[str, torch.Tensor] = {}
        for path, mask in (masks or {}).items():
            self[path] = mask

    # mapping protocol
    def __getitem__(self, path: str) -> torch.Tensor:
        return self._masks[path]

    def __setitem__(self, path: str, mask: torch.Tensor) -> None:
        w = masked_weight(self.model, path)
        if tuple(mask.shape) != tuple(w.shape):
            raise ModelError(f"mask for {path!r} has shape {tuple(mask.shape)} but the weight has {tuple(w.shape)}")
        self._masks[path] = mask.to(device=w.device, dtype=torch.bool)

    def __delitem__(self, path: str) -> None:
        del self._masks[path]

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    def __repr__(self) -> str:
        return f"Masks({len(self)} layers, sparsity {self.sparsity():.4f})"

    def bind(self, model: nn.Module) -> Masks:
        """The same masks bound to ``model`` (e.g. the QAT-prepared copy of the bound model)."""
        return Masks(model, self._masks)

    def apply(self, model: nn.Module | None = None) -> None:
        """Zero the pruned weights of ``model`` (default: the bound model), in place."""
        model = self.model if model is None else model
        with torch.no_grad():
            for path, mask in self._masks.items():
                w = masked_weight(model, path)
                if mask.device != w.device:
                    mask = mask.to(w.device)
                    if model is self.model:
                        self._masks[path] = mask
                w.mul_(mask)

    def attach(self, optimizer: torch.optim.Optimizer) -> RemovableHandle:
        """Re-apply the masks after every ``optimizer.step()``; returns a removable handle."""
        return optimizer.register_step_post_hook(lambda opt, args, kwargs: self.apply())

    def sparsity(self) -> float:
        """Fraction of masked-out positions over all masked layers (0 when empty)."""
        total = sum(m.numel() for m in self._masks.values())
        return sum(int((~m).sum()) for m in self._masks.values()) / total if total else 0.0


def as_masks(model: nn.Module, masks: Mapping[str, torch.Tensor] | None) -> Masks:
    """``masks`` bound to ``model`` (a :class:`Masks` already bound to it is returned as is)."""
    if isinstance(masks, Masks) and masks.model is model:
        return masks
    return Masks(model, masks)


# --------------------------------------------------------------------------- importance


class Importance(Protocol):
    """Scores weights; the lowest scores are pruned first. Returns a float tensor shaped like
    ``weight`` (any device)."""

    def __call__(self, weight: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor: ...


@dataclass(frozen=True)
class MagnitudeImportance:
    """``|w|``: the smallest weights go first (global magnitude pruning)."""

    def __call__(self, weight: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        return weight.detach().abs().float()


@dataclass(frozen=True)
class RandomImportance:
    """Uniform random scores (drawn on CPU from ``generator``): the baseline criterion."""

    def __call__(self, weight: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.rand(weight.shape, generator=generator)


IMPORTANCE: dict[str, Callable[[], Importance]] = {"magnitude": MagnitudeImportance, "random": RandomImportance}


def importance(name: str) -> Importance:
    """The criterion called ``name`` ('magnitude' or 'random')."""
    if name not in IMPORTANCE:
        raise ConfigError(f"prune.criterion: {name!r} is not one of {', '.join(IMPORTANCE)}")
    return IMPORTANCE[name]()


# --------------------------------------------------------------------------- schedules


def agp_sparsity(step: int, *, total_steps: int, target: float, initial: float = 0.0) -> float:
    """Cubic schedule (Zhu & Gupta 2017): ``initial`` at step 0, ``target`` from ``total_steps``
    on, ``s_t = target + (initial - target) * (1 - t / total_steps) ** 3`` in between."""
    if total_steps <= 0:
        return target
    t = min(max(step, 0), total_steps) / total_steps
    return target + (initial - target) * (1.0 - t) ** 3


def oneshot_sparsity(step: int, *, target: float) -> float:
    """All at once: ``target`` from the first step."""
    return target


def sparsity_at(
    epoch: int, *, epochs: int, target: float, schedule: str = "gradual", prune_fraction: float = 0.75
) -> float:
    """Target sparsity in force during ``epoch`` (0-based). Gradual: cubic ramp reaching
    ``target`` after ``prune_fraction`` of the epochs, then fixed for fine-tuning."""
    if schedule == "oneshot" or epochs <= 1:
        return oneshot_sparsity(epoch, target=target)
    n = max(1, round(epochs * prune_fraction))
    return agp_sparsity(min(epoch + 1, n), total_steps=n, target=target)


# --------------------------------------------------------------------------- pruner


class GlobalPruner:
    """Global unstructured pruning of ``model``: one threshold over all chosen layers.

    ``layers`` (module paths) default to :func:`prunable_layers` minus ``exclude``.
    ``update(sparsity)`` recomputes the masks so that exactly that fraction of the chosen
    weights is pruned (weights pruned before stay pruned) and zeroes them; ``step()`` does
    ``update(schedule(n))`` for its n-th call. Attach ``pruner.masks`` to the optimizer so
    the zeros survive training.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        importance: Importance = MagnitudeImportance(),
        layers: list[str] | None = None,
        exclude: tuple[str, ...] = (),
        schedule: Callable[[int], float] | None = None,
        masks: Mapping[str, torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
    ):
        self.model = model
        self.importance = importance
        self.layers = list(layers) if layers is not None else prunable_layers(model, tuple(exclude))
        self.schedule = schedule
        self.generator = generator
        self.masks = as_masks(model, masks)
        self.steps = 0

    def compute(self, sparsity: float, *, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The masks that prune ``sparsity`` of the chosen weights (the current masks' zeros
        included), without changing anything."""
        if not 0.0 <= sparsity < 1.0:
            raise ConfigError(f"sparsity must be in [0, 1), got {sparsity}")
        gen = generator if generator is not None else self.generator
        weights = [masked_weight(self.model, p) for p in self.layers]
        device = weights[0].device
        scores = []
        for path, w in zip(self.layers, weights, strict=True):
            s = self.importance(w, generator=gen).to(device=device, dtype=torch.float32)
            old = self.masks.get(path)
            if old is not None:
                s = torch.where(old.to(device), s, torch.full_like(s, -1.0))
            scores.append(s.flatten())
        flat = torch.cat(scores)
        n_prune = int(round(sparsity * flat.numel()))
        keep = torch.ones(flat.numel(), dtype=torch.bool, device=device)
        if n_prune > 0:
            keep[torch.topk(flat, n_prune, largest=False, sorted=False).indices] = False
        out, offset = {}, 0
        for path, w in zip(self.layers, weights, strict=True):
            out[path] = keep[offset : offset + w.numel()].view(w.shape)
            offset += w.numel()
        return out

    def update(self, sparsity: float, *, generator: torch.Generator | None = None) -> Masks:
        """Grow the masks to ``sparsity`` and zero the newly pruned weights."""
        self.masks.update(self.compute(sparsity, generator=generator))
        self.masks.apply()
        return self.masks

    def step(self) -> Masks:
        """Prune to ``schedule(n)`` at the n-th call (n counts from 0)."""
        if self.schedule is None:
            raise ConfigError(
                "GlobalPruner.step() needs a schedule, e.g. schedule=lambda n: agp_sparsity(n, total_steps=10, target=0.8)"
            )
        out = self.update(self.schedule(self.steps))
        self.steps += 1
        return out
