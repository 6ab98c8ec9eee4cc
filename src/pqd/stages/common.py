from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

FORMS = ("fp32", "qat", "ptq", "dynamic")


@dataclass
class Student:
    """The model being compressed, in its current form.

    ``masks`` maps a module path to the bool mask of that module's weight (empty until
    pruned); ``form`` is 'fp32', 'qat' (fake-quantized, trainable), 'ptq' (calibrated) or 'dynamic'
    (weights-only PTQ of the Linear layers, :mod:`pqd.qoptions`).
    ``freeze_fraction``: in 'qat' form, every training stage freezes observers and BN
    statistics for this last fraction of its epochs. ``records``: JSON-able facts a stage
    wants kept in the run's metrics, keyed by stage label.
    """

    model: nn.Module
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    form: str = "fp32"
    freeze_fraction: float = 0.25
    records: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.form not in FORMS:
            raise ValueError(f"Student.form must be one of {FORMS}, got {self.form!r}")

    @property
    def quantized(self) -> bool:
        return self.form != "fp32"

    @property
    def device(self) -> torch.device:
        for t in self.model.parameters():
            return t.device
        return torch.device("cpu")


def chain(*hooks: Callable[[int], None] | None) -> Callable[[int], None] | None:
    """Combine ``before_epoch`` hooks (``None`` entries are skipped)."""
    live = [h for h in hooks if h is not None]

    def run(epoch: int) -> None:
        for h in live:
            h(epoch)

    return run if live else None
