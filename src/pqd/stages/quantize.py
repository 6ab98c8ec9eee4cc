"""The quantize stage: QAT for some epochs, or static PTQ calibration, on the student's own
device. The INT8 machinery (FX graph mode, x86 scheme) lives in :mod:`pqd.compress.qat`; this module
drives it with pqd's loop and data. A quantized student becomes an INT8 model with
:func:`pqd.compress.student.convert_student`."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from pqd.compress import qat
from pqd.compress.qat import freeze, prepare, unfreeze
from pqd.compress.qoptions import quant_options
from pqd.compress.sparsity import Masks
from pqd.compress.student import Student
from pqd.config import QuantizeConfig, TrainConfig
from pqd.data import Splits, batches
from pqd.data.adapters import as_splits
from pqd.errors import ModelError
from pqd.train.loop import train
from pqd.train.tracking import Tracker

__all__ = ["qat_epoch_hook", "quantize"]

log = logging.getLogger("pqd.quantize")


def qat_epoch_hook(student: Student, epochs: int):
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
        _calibrate(model, data, config.calibration_batches, train_config.batch_size)
        # PTQ observers have no off switch: convert before running it on anything else.
        return replace(student, model=model, masks=dict(masks), form="ptq")
    out = replace(student, model=model, masks=dict(masks), form="qat", freeze_fraction=config.freeze_fraction)
    train(model, data, epochs=epochs, lr=config.lr, config=train_config, masks=masks, before_epoch=qat_epoch_hook(out, epochs),
          checkpoint=checkpoint, seed=seed, tag="quantize", tracker=tracker, amp=False, augment=augment)
    # Observers left on would keep re-estimating ranges on every later forward, evaluation
    # included, so the model would drift from what conversion sees: a stage ends frozen.
    freeze(model)
    out.masks = dict(masks)
    return out


def _calibrate(model: nn.Module, data: Splits, n_batches: int, batch_size: int) -> None:
    """PTQ calibration on the first ``n_batches`` (unshuffled, unaugmented) training batches."""
    it = batches(data.train, batch_size=batch_size, mean=data.mean, std=data.std, device=qat.model_device(model))
    qat.calibrate(model, it, num_batches=n_batches)
