"""PyTorch Lightning callback: prune, switch to QAT and distill inside ``Trainer.fit``.

Needs the ``lightning`` package (pqd's ``lightning`` extra). Usage::

    cb = PQDCallback(sparsity=0.8, prune_epochs=2, qat_epoch=2, freeze_epoch=3, teacher=teacher)
    Trainer(max_epochs=4, callbacks=[cb]).fit(module, loader)
    int8 = cb.convert()          # the INT8 GraphModule (CPU), as `pqd run` makes it

The compressed network is the LightningModule's attribute ``attr`` (default ``"model"``):

* pruning: global unstructured masks (:class:`pqd.compress.sparsity.GlobalPruner`) grow along the cubic
  schedule at the start of each epoch until ``prune_epochs``; they are attached to every
  optimizer, so pruned weights stay zero after every step;
* QAT: at the start of epoch ``qat_epoch`` the attribute is replaced by its FX fake-quant
  version, prepared in place on its device, so it shares the parameters your optimizer already
  holds; at ``freeze_epoch`` observers and BN statistics freeze;
* KD: with a ``teacher`` (moved to the module's device, kept in eval mode), the loss your ``training_step`` returns becomes
  ``T² · KL(teacher ‖ student) + alpha · loss`` (``KDLoss`` when your loss is cross-entropy),
  from the logits of the last training forward of the model.

A checkpoint written after ``qat_epoch`` holds the prepared model; resuming across the switch
is not supported.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from pqd.compress import qat
from pqd.compress.kd import KDLoss, teacher_logits
from pqd.compress.sparsity import GlobalPruner, Importance, MagnitudeImportance, Masks, agp_sparsity
from pqd.errors import ConfigError, ModelError

if TYPE_CHECKING:  # checked against the unified package; the standalone one has the same Callback API
    import lightning.pytorch as pl
else:
    try:
        import lightning.pytorch as pl
    except ImportError:  # pragma: no cover - exercised where lightning is absent
        try:
            import pytorch_lightning as pl
        except ImportError:
            raise ImportError(
                "pqd.integrations.lightning needs PyTorch Lightning: pip install 'pqd[lightning]' (or pip install lightning)"
            ) from None

__all__ = ["PQDCallback"]

_MAGNITUDE = MagnitudeImportance()  # the default criterion: stateless, so one shared instance serves every callback


class PQDCallback(pl.Callback):
    """Prune → QAT → KD for a LightningModule's ``attr`` network. All options are keyword-only;
    ``sparsity=0`` skips pruning, ``qat_epoch=None`` skips QAT, ``teacher=None`` skips KD."""

    def __init__(
        self,
        *,
        attr: str = "model",
        sparsity: float = 0.0,
        prune_epochs: int = 1,
        exclude: tuple[str, ...] = ("@first",),
        importance: Importance = _MAGNITUDE,
        qat_epoch: int | None = None,
        freeze_epoch: int | None = None,
        example: torch.Tensor | None = None,
        reduce_range: bool = False,
        teacher: nn.Module | None = None,
        temperature: float = 4.0,
        alpha: float = 0.5,
    ):
        super().__init__()
        if not 0.0 <= sparsity < 1.0:
            raise ConfigError(f"PQDCallback: sparsity must be in [0, 1), got {sparsity}")
        if prune_epochs < 1:
            raise ConfigError(f"PQDCallback: prune_epochs must be >= 1, got {prune_epochs}")
        if qat_epoch is not None and (qat_epoch < 0 or (freeze_epoch is not None and freeze_epoch < qat_epoch)):
            raise ConfigError(f"PQDCallback: need 0 <= qat_epoch <= freeze_epoch, got {qat_epoch} and {freeze_epoch}")
        if freeze_epoch is not None and qat_epoch is None:
            raise ConfigError("PQDCallback: freeze_epoch needs qat_epoch")
        self.attr, self.sparsity, self.prune_epochs, self.exclude = attr, sparsity, prune_epochs, tuple(exclude)
        self.importance, self.qat_epoch, self.freeze_epoch = importance, qat_epoch, freeze_epoch
        self.example, self.reduce_range = example, reduce_range
        self.teacher = teacher
        self.kd = KDLoss(temperature=temperature, alpha=alpha) if teacher is not None else None
        self.alpha = alpha
        self.masks: Masks | None = None
        self.pruner: GlobalPruner | None = None
        self.quantized = False
        self._last: tuple[Any, torch.Tensor] | None = None
        self._hook: RemovableHandle | None = None
        self._handles: list = []

    # ------------------------------------------------------------------ helpers
    def _net(self, pl_module) -> nn.Module:
        net = getattr(pl_module, self.attr, None)
        if not isinstance(net, nn.Module):
            raise ModelError(
                f"PQDCallback: the LightningModule has no nn.Module attribute {self.attr!r}; pass attr= the name of its network"
            )
        return net

    def _capture(self, net: nn.Module) -> None:
        if self._hook is not None:
            self._hook.remove()

        def hook(module, inputs, output):
            if module.training and isinstance(output, torch.Tensor):
                self._last = (inputs[0], output)

        self._hook = net.register_forward_hook(hook)

    # ------------------------------------------------------------------ Lightning hooks
    def on_fit_start(self, trainer, pl_module) -> None:
        net = self._net(pl_module)
        if self.sparsity > 0:
            schedule = functools.partial(_epoch_sparsity, epochs=self.prune_epochs, target=self.sparsity)
            self.pruner = GlobalPruner(net, importance=self.importance, exclude=self.exclude, schedule=schedule)
            self.masks = self.pruner.masks
        for opt in trainer.optimizers:
            self._handles.append(opt.register_step_post_hook(self._after_step))
        if self.teacher is not None:
            self.teacher.eval().requires_grad_(False).to(pl_module.device)
            self._capture(net)
            original = pl_module.training_step

            @functools.wraps(original)
            def training_step(*args, **kwargs):
                self._last = None
                out = original(*args, **kwargs)
                return self._add_kd(out)

            pl_module.training_step = training_step

    def _after_step(self, opt, args, kwargs) -> None:
        if self.masks is not None:
            self.masks.apply()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        epoch = trainer.current_epoch
        if self.qat_epoch is not None and epoch >= self.qat_epoch and not self.quantized:
            self._to_qat(pl_module)
        if self.pruner is not None and self.pruner.schedule is not None and epoch < self.prune_epochs:
            self.pruner.update(self.pruner.schedule(epoch))
        if self.quantized and self.freeze_epoch is not None and epoch >= self.freeze_epoch:
            qat.freeze(self._net(pl_module))

    def _to_qat(self, pl_module) -> None:
        net = self._net(pl_module)
        example = self.example if self.example is not None else getattr(pl_module, "example_input_array", None)
        if not isinstance(example, torch.Tensor):
            raise ModelError(
                "PQDCallback: QAT needs an example input: pass example= or set the LightningModule's example_input_array"
            )
        prepared = qat.prepare_qat(net, example, reduce_range=self.reduce_range, inplace=True)
        setattr(pl_module, self.attr, prepared)
        if self.masks is not None:
            self.masks = self.masks.bind(prepared)
            if self.pruner is not None:
                self.pruner.model, self.pruner.masks = prepared, self.masks
            self.masks.apply()
        if self.teacher is not None:
            self._capture(prepared)
        self.quantized = True

    def _add_kd(self, out):
        if self._last is None or self.teacher is None or self.kd is None:  # _last is captured only with a teacher
            return out
        loss = out["loss"] if isinstance(out, dict) else out
        x, logits = self._last
        total = self.kd.soft(logits, teacher_logits(self.teacher, x)) + self.alpha * loss
        if isinstance(out, dict):
            return {**out, "loss": total}
        return total

    def on_train_end(self, trainer, pl_module) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.quantized:
            qat.freeze(self._net(pl_module))
        self._module = pl_module

    # ------------------------------------------------------------------ results
    def convert(self, pl_module=None) -> nn.Module:
        """The INT8 model (CPU FX GraphModule) of the trained network, masks re-applied."""
        if not self.quantized:
            raise ModelError("PQDCallback.convert: the network was never switched to QAT (set qat_epoch)")
        net = self._net(pl_module if pl_module is not None else self._module)
        return qat.convert(net, masks=self.masks)


def _epoch_sparsity(epoch: int, *, epochs: int, target: float) -> float:
    """Cubic ramp reaching ``target`` at the start of the last pruning epoch."""
    return agp_sparsity(epoch + 1, total_steps=epochs, target=target)
