"""The quantize stage: QAT for some epochs, or static PTQ calibration, on the student's own
device. The INT8 machinery (FX graph mode, x86 scheme) lives in :mod:`pqd.compress.qat`; this module
drives it with pqd's loop and data. A quantized student becomes an INT8 model with
:func:`pqd.compress.student.convert_student`."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from pqd.compress import qat
from pqd.compress.qat import freeze, prepare
from pqd.compress.qoptions import GRANULARITIES, MODES, quant_options
from pqd.compress.sparsity import Masks
from pqd.compress.student import Student, qat_epoch_hook
from pqd.config import Section, TrainConfig, choice, fail, in_range
from pqd.data import Splits, batches
from pqd.data.adapters import as_splits
from pqd.errors import ModelError
from pqd.stages.protocol import RunConfig, Stage, StageContext, StageSpec, register_stage
from pqd.train.loop import train
from pqd.train.tracking import Tracker

__all__ = ["QuantizeConfig", "QuantizeStage", "freeze_check", "note_freeze_check", "quantize"]

log = logging.getLogger("pqd.quantize")


@dataclass(frozen=True)
class QuantizeConfig(Section):
    """INT8 quantization for x86: per-channel symmetric weights, per-tensor affine
    activations, BN folded. ``mode``: 'qat' (train) or 'ptq' (static calibration only).
    Observers and BN statistics freeze for the last ``freeze_fraction`` of QAT epochs.
    ``reduce_range``: 7-bit activations, only needed for deployment CPUs without VNNI.
    ``mode: dynamic``: weights-only int8 PTQ of the Linear layers (activations quantized at run
    time; convolutions stay FP32). ``granularity`` ('per_channel' | 'per_tensor') and
    ``symmetric`` choose the weight scheme (see :mod:`pqd.compress.qoptions`, docs/QUANTIZATION.md).
    ``leaf_modules``: submodules torch.fx must not trace into (an untraceable user block):
    submodule paths ('layer3.0') or classes ('package.module:Class'); they stay FP32.
    ``float_modules``: submodule paths traced but left FP32 inside the INT8 model (per-layer
    fallback of the layers most sensitive to INT8; ``pqd analyze`` ranks them, ``pqd tune`` uses it)."""

    mode: str = "qat"
    lr: float = 0.005
    freeze_fraction: float = 0.25
    calibration_batches: int = 16
    reduce_range: bool = False
    granularity: str = "per_channel"
    symmetric: bool = True
    leaf_modules: tuple[str, ...] = ()
    float_modules: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        choice("quantize.mode", self.mode, MODES)
        choice("quantize.granularity", self.granularity, GRANULARITIES)
        in_range("quantize.lr", self.lr, 0.0)
        in_range("quantize.freeze_fraction", self.freeze_fraction, 0.0, 1.0)
        in_range("quantize.calibration_batches", self.calibration_batches, 1)


def freeze_check(student: Student, data: Splits, *, lr_key: str, batch_size: int = 256) -> qat.FreezeCheck | None:
    """A :class:`pqd.compress.qat.FreezeCheck` for a fake-quant stage, on up to ``batch_size`` validation images
    (training images, unaugmented, without a validation split); None for other forms."""
    if student.form != "qat":
        return None
    ds = data.val if data.val is not None and len(data.val) else data.train
    x, y = next(
        iter(
            batches(
                ds.subset(torch.arange(min(batch_size, len(ds)))), batch_size=batch_size, mean=data.mean, std=data.std
            )
        )
    )
    advice = (
        f"lower {lr_key} (a tenth is a good start) or quantize.freeze_fraction, then re-run "
        '(see docs/TROUBLESHOOTING.md, "Training that went wrong")'
    )
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


def quantize(
    student: Student,
    config: QuantizeConfig,
    *,
    data: Splits,
    epochs: int,
    train_config: TrainConfig = TrainConfig(),
    checkpoint: str | Path | None = None,
    seed: int = 0,
    augment: bool = True,
    tracker: Tracker | None = None,
) -> Student:
    """QAT for ``epochs`` (``config.mode == 'qat'``) or static calibration (``'ptq'``), on the
    device the student's model is on. The input model is not modified."""
    if student.quantized:
        raise ModelError("the student is already quantized; quantize runs once per pipeline")
    data = as_splits(data)
    model = prepare(
        student.model,
        torch.zeros(2, *data.image_shape),
        mode=config.mode,
        reduce_range=config.reduce_range,
        options=quant_options(config),
        leaf_modules=config.leaf_modules,
        float_modules=config.float_modules,
    )
    masks = Masks(model, student.masks)
    masks.apply()
    if config.mode == "dynamic":  # weights only: the scales come from the weights at conversion, no calibration
        return replace(student, model=model, masks=dict(masks), form="dynamic")
    if config.mode == "ptq":
        _calibrate(model, data, config.calibration_batches, train_config.batch_size)
        # PTQ observers have no off switch: convert before running it on anything else.
        return replace(student, model=model, masks=dict(masks), form="ptq")
    out = replace(student, model=model, masks=dict(masks), form="qat", freeze_fraction=config.freeze_fraction)
    check = freeze_check(out, data, lr_key="quantize.lr")
    train(
        model,
        data,
        epochs=epochs,
        lr=config.lr,
        config=train_config,
        masks=masks,
        before_epoch=qat_epoch_hook(out, epochs, check),
        checkpoint=checkpoint,
        seed=seed,
        tag="quantize",
        lr_key="quantize.lr",
        tracker=tracker,
        amp=False,
        augment=augment,
    )
    note_freeze_check(out, check, tag="quantize")
    # Observers left on would keep re-estimating ranges on every later forward, evaluation
    # included, so the model would drift from what conversion sees: a stage ends frozen.
    freeze(model)
    out.masks = dict(masks)
    return out


def _calibrate(model: nn.Module, data: Splits, n_batches: int, batch_size: int) -> None:
    """PTQ calibration on the first ``n_batches`` (unshuffled, unaugmented) training batches."""
    it = batches(data.train, batch_size=batch_size, mean=data.mean, std=data.std, device=qat.model_device(model))
    qat.calibrate(model, it, num_batches=n_batches)


class QuantizeStage(Stage):
    """Stage 'quantize' / 'Q', section 'quantize': the one stage that makes the student INT8-ready."""

    name, letter, section, config_class = "quantize", "Q", "quantize", QuantizeConfig
    quantizes = True

    def validate(self, config: RunConfig, spec: StageSpec) -> None:
        mode = config.quantize.mode
        if mode in ("ptq", "dynamic"):
            if config.stages[-1].stage != self.name:
                fail(
                    "quantize.mode",
                    f"{mode!r} calibrates without training, so quantize must be the last stage; use mode 'qat' to train after quantizing",
                )
            if spec.epochs:
                fail("stages", f"quantize.mode {mode!r} takes no epochs; write 'Q:0' (or 'Q') or use mode 'qat'")
        elif spec.epochs == 0:
            fail(
                "stages",
                "quantize.mode 'qat' needs epochs ('Q:N' with N>0); use quantize.mode 'ptq' for calibration only",
            )

    def preflight(self, model: nn.Module, config: RunConfig, example: torch.Tensor) -> None:
        """torch.fx can trace the model (raises ModelError naming the untraceable submodule)."""
        q = config.quantize
        prepare(
            model,
            example,
            mode=q.mode,
            reduce_range=q.reduce_range,
            options=quant_options(q),
            leaf_modules=q.leaf_modules,
            float_modules=q.float_modules,
        )

    def run(
        self,
        student: Student,
        section_config: QuantizeConfig,
        ctx: StageContext,
        *,
        epochs: int,
        checkpoint: Path | None,
    ) -> Student:
        return quantize(
            student,
            section_config,
            data=ctx.data,
            epochs=epochs,
            train_config=ctx.train_config,
            checkpoint=checkpoint,
            seed=ctx.seed,
            augment=ctx.augment,
            tracker=ctx.tracker,
        )


register_stage(QuantizeStage())
