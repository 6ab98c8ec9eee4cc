"""Stop runs that went wrong instead of reporting garbage as a result.

:class:`DivergenceGuard` watches a training loop: each step's loss is folded into a flag on
the loss's own device (no host sync), the flag is read every ``every`` steps and at the end
of each epoch, where the model's parameters and floating-point buffers (BN statistics) are
checked too. Under DistributedDataParallel the flag is all-reduced at each read (every rank
must call :meth:`DivergenceGuard.step` and :meth:`DivergenceGuard.end_epoch` at the same
steps, which the training loop does), so all ranks stop together. A non-finite value raises :class:`pqd.errors.DivergenceError` naming the stage,
epoch, step range and learning rate. :meth:`DivergenceGuard.explain` turns the errors a
diverged model causes later (``zero_point must be between quant_min and quant_max`` from
a fake-quantize observer fed NaNs) into the same error.

:func:`check_teacher_quality` flags a teacher no better than chance (or one that predicts
one class for everything) before compression is spent on it; :func:`check_sparsity` flags
a pruning stage whose achieved sparsity is far from its target (NaN weights are never
"smallest", so a diverged model prunes to nothing).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from pqd.errors import DivergenceError

__all__ = ["DivergenceGuard", "first_nonfinite", "check_teacher_quality", "check_sparsity", "summary"]


def first_nonfinite(model: nn.Module) -> str | None:
    """The name of the first parameter or floating-point buffer holding NaN/inf, or None."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t.detach()).all()):
            return name
    return None


class DivergenceGuard:
    """Checks one training phase (``stage`` "teacher", "prune", "distill"...).

    ``lr_key``: the config key of the phase's learning rate, for the remedy
    (e.g. "teacher.lr"); ``base_lr``: its value (the per-step rate of a warm-up/cosine
    schedule differs from it; messages show both). ``every``: steps between host reads of the loss flag (each read
    syncs a GPU stream; 1 checks every step). ``max_loss``: a finite loss above this also
    counts as divergence (None: only NaN/inf).
    """

    def __init__(
        self,
        stage: str,
        *,
        lr_key: str | None = None,
        base_lr: float | None = None,
        every: int = 50,
        max_loss: float | None = None,
    ) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.stage, self.lr_key, self.base_lr, self.every, self.max_loss = stage, lr_key, base_lr, every, max_loss
        self._bad: torch.Tensor | None = None
        self._device: torch.device | None = None
        self._since = 0  # first step not yet confirmed finite
        self._epoch = 0

    def _message(self, what: str, *, epoch: int, steps: str, lr: float | None) -> str:
        base = f"{self.lr_key or 'lr'} = {self.base_lr:.3g}" if self.base_lr is not None else ""
        rates = "; ".join(r for r in (f"learning rate {lr:.3g} at that step" if lr is not None else "", base) if r)
        key = f" (--set {self.lr_key}=...)" if self.lr_key else ""
        return (
            f"{self.stage}: training diverged: {what} at epoch {epoch + 1}, {steps}"
            + (f" ({rates})" if rates else "")
            + ". "
            f"Lower the learning rate{key}, check the input data and the teacher, then re-run. "
            "No checkpoint of the diverged epoch was saved."
        )

    def step(self, loss: torch.Tensor, *, epoch: int, step: int, lr: float | None = None) -> None:
        """Record the step's (detached or not) scalar loss; raises every ``every`` steps if any was bad."""
        loss = loss.detach()
        self._device = loss.device
        bad = ~torch.isfinite(loss)
        if self.max_loss is not None:
            bad = bad | (loss > self.max_loss)
        if self._bad is None or self._epoch != epoch:
            self._bad, self._epoch, self._since = bad.clone(), epoch, step
        else:
            self._bad |= bad
        if (step + 1) % self.every == 0:
            self._flush(epoch=epoch, step=step, lr=lr)

    def _any_bad(self) -> bool:
        """Whether any step since the last read was bad, on any rank: under DDP every rank reads
        the same answer (all_reduce MAX), so all raise together and none waits in a collective."""
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = self._device or (
                torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
            )
            flag = (
                self._bad.to(device=device, dtype=torch.int32)
                if self._bad is not None
                else torch.zeros((), dtype=torch.int32, device=device)
            ).reshape(())
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            return bool(flag)
        return self._bad is not None and bool(self._bad)

    def _flush(self, *, epoch: int, step: int, lr: float | None) -> None:
        if self._any_bad():
            what = (
                "the loss became NaN/inf"
                if self.max_loss is None
                else f"the loss became NaN/inf or exceeded {self.max_loss:g}"
            )
            steps = f"step {step + 1}" if self._since == step else f"between steps {self._since + 1} and {step + 1}"
            self._bad = None
            raise DivergenceError(self._message(what, epoch=epoch, steps=steps, lr=lr))
        self._bad, self._since = None, step + 1

    def end_epoch(self, model: nn.Module, *, epoch: int, step: int, lr: float | None = None) -> None:
        """At the end of an epoch (before its checkpoint is saved): read the loss flag, then
        check every parameter and float buffer of ``model``."""
        self._flush(epoch=epoch, step=step, lr=lr)
        self.check_model(model, epoch=epoch, step=step, lr=lr)

    def check_model(self, model: nn.Module, *, epoch: int, step: int, lr: float | None = None) -> None:
        name = first_nonfinite(model)
        if name is not None:
            raise DivergenceError(
                self._message(f"{name!r} holds NaN/inf values", epoch=epoch, steps=f"step {step + 1}", lr=lr)
            )

    def explain(
        self, exc: BaseException, model: nn.Module, *, epoch: int, step: int, lr: float | None = None
    ) -> DivergenceError | None:
        """A :class:`DivergenceError` when ``exc`` (raised by a forward/backward pass) came
        from non-finite weights, else None: raise it ``from e``, or re-raise ``e`` on None."""
        name = first_nonfinite(model)
        if name is None:
            return None
        err = DivergenceError(
            self._message(
                f"{name!r} holds NaN/inf values ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})",
                epoch=epoch,
                steps=f"step {step + 1}",
                lr=lr,
            )
        )
        err.__cause__ = exc
        return err


def check_teacher_quality(
    top1: float,
    num_classes: int,
    *,
    min_ratio: float = 1.5,
    pred_counts: Sequence[int] | torch.Tensor | None = None,
    label_counts: Sequence[int] | torch.Tensor | None = None,
    max_one_class: float = 0.9,
    where: str = "teacher",
    strict: bool = True,
) -> str | None:
    """Raise :class:`DivergenceError` when the teacher is at chance level (with
    ``strict=False``: return the message instead, for a warning; None when the teacher is fine).

    ``top1`` (a fraction in [0, 1], on held-out data) must exceed ``min_ratio`` times chance
    (1 / ``num_classes``). ``pred_counts`` (how often each class was predicted) also flags
    a teacher that answers one class for more than ``max_one_class`` of the images, unless
    ``label_counts`` (the same images' labels) hold that class as often: a slice of one class is
    answered with that class by a good model.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    chance = 1.0 / num_classes
    remedy = (
        "Compressing it would waste the run: check teacher.lr (a diverged teacher lands exactly at chance), "
        "teacher.epochs, teacher.weights and the data, then re-run."
    )
    message = None
    if not math.isfinite(top1) or top1 <= min_ratio * chance:
        message = (
            f"{where}: top-1 {100 * top1:.2f}% is at chance level ({100 * chance:.2f}% for {num_classes} classes; "
            f"needs more than {100 * min_ratio * chance:.2f}%). {remedy}"
        )
    elif pred_counts is not None:
        counts = torch.as_tensor(pred_counts, dtype=torch.float64)
        total = float(counts.sum())
        share = float(counts.max()) / total if total > 0 else 0.0
        if label_counts is not None and total > 0:
            labels = torch.as_tensor(label_counts, dtype=torch.float64)
            share = share if float(labels[int(counts.argmax())]) / total <= max_one_class else 0.0
        if share > max_one_class:
            message = (
                f"{where}: predicts class {int(counts.argmax())} for {100 * float(counts.max()) / total:.1f}% of the "
                f"images (top-1 {100 * top1:.2f}%); the model has collapsed. {remedy}"
            )
    if message is not None and strict:
        raise DivergenceError(message)
    return message


def check_sparsity(target: float, achieved: float, *, tolerance: float = 0.05, where: str = "prune") -> None:
    """Raise :class:`DivergenceError` when ``achieved`` sparsity is not within ``tolerance``
    of ``target`` (NaN weights cannot be ranked, so a diverged model ends up unpruned)."""
    if not (math.isfinite(achieved) and abs(achieved - target) <= tolerance):
        raise DivergenceError(
            f"{where}: achieved sparsity {100 * achieved:.1f}% is far from the target {100 * target:.1f}%; "
            "the weights are probably NaN/inf (training diverged). Lower the learning rate and re-run."
        )


def summary(model: nn.Module) -> dict[str, Any]:
    """Largest absolute weight and count of non-finite values (for logs and metrics)."""
    bad, biggest = 0, 0.0
    for p in model.parameters():
        t = p.detach()
        fin = torch.isfinite(t)
        bad += int((~fin).sum())
        if bool(fin.any()):
            biggest = max(biggest, float(t[fin].abs().max()))
    return {"nonfinite": bad, "max_abs_weight": biggest}
