"""The quantize stage: QAT for some epochs, or static PTQ calibration, on the student's own
device. The INT8 machinery (FX graph mode, x86 scheme) lives in :mod:`pqd.qat`; this module
drives it with pqd's loop and data and keeps the stage-level names (``prepare``, ``convert``,
``to_torchscript``) that the pipeline and export use."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from pqd import qat
from pqd.config import QuantizeConfig, TrainConfig
from pqd.data import Splits, batches
from pqd.data.adapters import as_splits
from pqd.errors import ModelError
from pqd.integrations.tracking import Tracker
from pqd.qat import BACKEND, float_modules, freeze, prepare, qconfig_mapping, to_torchscript, unfreeze
from pqd.qoptions import quant_options
from pqd.sparsity import Masks
from pqd.stages.common import Student
from pqd.train.loop import train

__all__ = [
    "BACKEND", "calibrate", "convert", "float_modules", "freeze", "prepare", "qat_epoch_hook", "qconfig_mapping",
    "quantize", "to_torchscript", "unfreeze", "freeze_check", "note_freeze_check",
]

log = logging.getLogger("pqd.quantize")

# Deprecated alias kept for callers that imported the private helper; use pqd.qat.fx_modules.
_fx = qat.fx_modules


def freeze_check(student: Student, data: Splits, *, lr_key: str, batch_size: int = 256) -> qat.FreezeCheck | None:
    """A :class:`pqd.qat.FreezeCheck` for a fake-quant stage, on up to ``batch_size`` validation images
    (training images, unaugmented, without a validation split); None for other forms."""
    if student.form != "qat":
        return None
    ds = data.val if data.val is not None and len(data.val) else data.train
    x, y = next(iter(batches(ds.subset(torch.arange(min(batch_size, len(ds)))), batch_size=batch_size, mean=data.mean,
                             std=data.std)))
    advice = (f"lower {lr_key} (a tenth is a good start) or quantize.freeze_fraction, then re-run "
              "(see docs/TROUBLESHOOTING.md, \"Training that went wrong\")")
    return qat.FreezeCheck(student.model, (x, y), advice=advice)


def note_freeze_check(student: Student, check: qat.FreezeCheck | None, *, tag: str) -> None:
    """Log and record (``student.records[tag]['warnings']``, for metrics.json) a collapse since the freeze."""
    if check is None or check.before is None:
        return
    message = check.finish()
    if message:
        message = f"{tag}: {message}"
        log.warning("%s", message)
        rec = student.records.setdefault(tag, {})
        rec["warnings"] = [*rec.get("warnings", []), message]


def qat_epoch_hook(student: Student, epochs: int, check: qat.FreezeCheck | None = None) -> Callable[[int], None] | None:
    """``before_epoch`` hook for any stage that trains a fake-quant student: observers and BN
    statistics update until the last ``student.freeze_fraction`` of the epochs, then freeze.

    Frozen BN removes the scale invariance that BN gives the weights, so training with it
    frozen tolerates only a small learning rate, which the cosine schedule's tail gives only when the
    stage is long enough (see docs/TROUBLESHOOTING.md, "Training that went wrong").
    """
    if student.form != "qat":
        return None
    freeze_from = epochs - int(round(student.freeze_fraction * epochs))

    def hook(epoch: int) -> None:
        if check is not None and epoch == freeze_from:
            check.start()  # freezes, and measures the held-out batch at the boundary
        (freeze if epoch >= freeze_from else unfreeze)(student.model)

    return hook


def quantize(
    student: Student, config: QuantizeConfig, *, data: Splits, epochs: int, train_config: TrainConfig = TrainConfig(),
    checkpoint: str | Path | None = None, seed: int = 0, augment: bool = True, tracker: Tracker | None = None,
) -> Student:
    """QAT for ``epochs`` (``config.mode == 'qat'``) or static calibration (``'ptq'``), on the
    device the student's model is on. The input model is not modified."""
    if student.quantized:
        raise ModelError("the student is already quantized; quantize runs once per pipeline")
    data = as_splits(data)
    model = prepare(student.model, torch.zeros(2, *data.image_shape), mode=config.mode, reduce_range=config.reduce_range,
                    options=quant_options(config), leaf_modules=config.leaf_modules)
    masks = Masks(model, student.masks)
    masks.apply()
    if config.mode == "dynamic":  # weights only: the scales come from the weights at conversion, no calibration
        return replace(student, model=model, masks=dict(masks), form="dynamic")
    if config.mode == "ptq":
        calibrate(model, data, config.calibration_batches, train_config.batch_size)
        # PTQ observers have no off switch: convert before running it on anything else.
        return replace(student, model=model, masks=dict(masks), form="ptq")
    out = replace(student, model=model, masks=dict(masks), form="qat", freeze_fraction=config.freeze_fraction)
    check = freeze_check(out, data, lr_key="quantize.lr")
    train(model, data, epochs=epochs, lr=config.lr, config=train_config, masks=masks, before_epoch=qat_epoch_hook(out, epochs, check),
          checkpoint=checkpoint, seed=seed, tag="quantize", tracker=tracker, amp=False, augment=augment)
    note_freeze_check(out, check, tag="quantize")
    # Observers left on would keep re-estimating ranges on every later forward, evaluation
    # included, so the model would drift from what conversion sees: a stage ends frozen.
    freeze(model)
    out.masks = dict(masks)
    return out


def calibrate(model: nn.Module, data: Splits, n_batches: int, batch_size: int) -> None:
    """PTQ calibration on the first ``n_batches`` (unshuffled, unaugmented) training batches."""
    it = batches(data.train, batch_size=batch_size, mean=data.mean, std=data.std, device=qat.model_device(model))
    qat.calibrate(model, it, num_batches=n_batches)


def convert(student: Student) -> nn.Module:
    """Convert a quantized student to a real INT8 model that runs on x86 integer kernels (CPU)."""
    if not student.quantized:
        raise ModelError("convert needs a quantized student (run the quantize stage first)")
    return qat.convert(student.model, masks=student.masks)
