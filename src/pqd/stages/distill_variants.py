"""The distill stage's variants (``distill.kind``): feature hints, attention transfer, online
mutual learning and self-distillation, driven by pqd's training loop. The losses live in
:mod:`pqd.compress.kd_variants`; ``kind: response`` stays :func:`pqd.stages.distill.distill`.

What each kind trains (``alpha``, ``temperature``, ``beta`` from the ``distill`` section):

* ``feature``: ``KDLoss(student, teacher) + beta * HintLoss`` on ``distill.layers`` (default:
  each top-level block's output), with learned 1x1 adapters where the widths differ;
  ``beta`` defaults to 1.
* ``attention``: ``KDLoss(student, teacher) + beta * AttentionLoss``; ``beta`` defaults to
  1000 (Zagoruyko & Komodakis).
* ``mutual``: the student and ``distill.peers`` peers (the student's architecture, freshly
  initialised from the run's seed) train together with :class:`~pqd.compress.kd_variants.MutualLearningLoss`;
  no teacher is used. The peers are dropped at the end.
* ``self``: :class:`~pqd.compress.kd_variants.SelfDistillationLoss` with auxiliary heads on every tapped
  block except the deepest (``beta`` defaults to 1); no teacher is used. Heads are dropped.

Adapters, heads and peers are trained with the student: they sit next to it in a
training-only module (:class:`Bundle`), so the loop's optimizer and per-epoch checkpoints
(resume) cover them; the student keeps its masks (pruned weights stay zero) and form.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from pqd.compress.kd import KDLoss, distillation_loss
from pqd.compress.kd_variants import (
    AttentionLoss,
    FeatureTaps,
    HintLoss,
    MutualLearningLoss,
    SelfDistillationLoss,
    auto_layers,
    feature_shapes,
)
from pqd.compress.qat import freeze, model_device
from pqd.compress.student import Student, qat_epoch_hook
from pqd.config import TrainConfig
from pqd.data import Splits
from pqd.data.adapters import as_splits
from pqd.errors import ConfigError
from pqd.models.reinit import reinitialize
from pqd.train.loop import epoch_seed, train
from pqd.train.tracking import Tracker

__all__ = ["Bundle", "DEFAULT_BETA", "NEEDS_TEACHER", "distill_variant"]

DEFAULT_BETA = {"feature": 1.0, "attention": 1000.0, "self": 1.0, "mutual": 0.0}
NEEDS_TEACHER = ("response", "feature", "attention")


class VariantConfig(Protocol):
    """What :func:`distill_variant` reads of its config: the fields of :class:`pqd.stages.distill.DistillConfig`
    (not imported: that module imports this one)."""

    @property
    def kind(self) -> str: ...
    @property
    def layers(self) -> tuple[str, ...]: ...
    @property
    def beta(self) -> float | None: ...
    @property
    def peers(self) -> int: ...
    @property
    def temperature(self) -> float: ...
    @property
    def alpha(self) -> float: ...
    @property
    def lr(self) -> float: ...


class Bundle(nn.Module):
    """Training-only holder: ``main`` (the student) and ``aux`` (adapters, heads, peers).
    ``forward`` is the student's, so the loop's accuracy is the student's."""

    def __init__(self, main: nn.Module, aux: nn.Module):
        super().__init__()
        self.main = main
        self.aux = aux

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.main(x)
        return out


def distill_variant(
    student: Student,
    config: VariantConfig,
    *,
    teacher: nn.Module | None,
    data: Splits,
    epochs: int,
    train_config: TrainConfig = TrainConfig(),
    checkpoint: str | Path | None = None,
    seed: int = 0,
    augment: bool = True,
    tracker: Tracker | None = None,
) -> Student:
    """Train ``student`` for ``epochs`` with the KD variant ``config.kind`` (``config``: the distill section; module doc)."""
    kind = config.kind
    if kind == "response":
        raise ConfigError("distill.kind 'response' is pqd.stages.distill.distill; distill_variant runs the other kinds")
    if kind in NEEDS_TEACHER and teacher is None:
        raise ConfigError(f"distill.kind {kind!r} needs the dense teacher")
    data = as_splits(data)
    model = student.model
    device = model_device(model)
    beta = config.beta if config.beta is not None else DEFAULT_BETA[kind]
    example = torch.zeros(2, *data.image_shape, device=device)
    layers = list(config.layers) or auto_layers(model, example)
    taps: list[FeatureTaps] = []  # removed when training ends
    aux: nn.Module
    record: dict[str, Any] = {"kind": kind, "beta": beta}

    if kind in ("feature", "attention"):
        assert teacher is not None  # NEEDS_TEACHER, checked above
        teacher.eval()
        t_dev = model_device(teacher)
        s_shapes = feature_shapes(model, layers, example)
        t_shapes = feature_shapes(teacher, layers, example.to(t_dev))
        feat = HintLoss([s[1] for s in s_shapes], [t[1] for t in t_shapes]) if kind == "feature" else AttentionLoss()
        aux = feat.to(device)
        kd = KDLoss(temperature=config.temperature, alpha=config.alpha)
        s_taps, t_taps = FeatureTaps(model, layers), FeatureTaps(teacher, layers)
        taps += [s_taps, t_taps]
        record["layers"] = layers

        response = distillation_loss(kd, teacher)

        def loss(logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = response(logits, x, y) + beta * feat(s_taps.get(), t_taps.get())
            return out
    elif kind == "mutual":
        peers = nn.ModuleList(reinitialize(model, seed=epoch_seed(seed, "mutual-peer", i)) for i in range(config.peers))
        aux = peers
        dml = MutualLearningLoss(temperature=config.temperature)
        record["peers"] = config.peers

        def loss(logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = dml([logits, *(p(x) for p in peers)], y)
            return out
    elif kind == "self":
        if len(layers) < 2 and not config.layers:
            raise ConfigError(
                f"distill.kind 'self' needs at least two blocks to tap; {type(model).__name__} has {layers}"
            )
        shallow = layers[:-1] if not config.layers else layers
        shapes = feature_shapes(model, shallow, example)
        num_classes = _eval_out(model, example)
        sd = SelfDistillationLoss(
            [s[1] for s in shapes], num_classes, temperature=config.temperature, alpha=config.alpha, beta=beta
        ).to(device)
        aux = sd
        s_taps = FeatureTaps(model, shallow)
        taps.append(s_taps)
        record["layers"] = shallow

        def loss(logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = sd(logits, s_taps.get(), y)
            return out
    else:  # config validation keeps this unreachable
        raise ConfigError(f"distill.kind {kind!r} is not known")

    bundle = Bundle(model, aux)
    masks = {f"main.{k}": v for k, v in student.masks.items()}
    qat_hook = qat_epoch_hook(student, epochs)
    try:
        train(
            bundle,
            data,
            epochs=epochs,
            lr=config.lr,
            config=train_config,
            loss_fn=loss,
            masks=masks,
            before_epoch=qat_hook,
            checkpoint=checkpoint,
            seed=seed,
            tag=f"distill-{kind}",
            lr_key="distill.lr",
            tracker=tracker,
            amp=not student.quantized,
            augment=augment,
        )
    finally:
        for t in taps:
            t.remove()
    if student.quantized:
        freeze(model)
    out_masks = {k[5:]: v for k, v in masks.items()}
    return replace(student, model=model, masks=out_masks, records=dict(student.records) | {"distill": record})


def _eval_out(model: nn.Module, example: torch.Tensor) -> int:
    """Number of outputs (classes) of ``model`` (one eval-mode forward; the mode is restored)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        n = int(model(example[:1]).shape[1])
    model.train(was_training)
    return n
