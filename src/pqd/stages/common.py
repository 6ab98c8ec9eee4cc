from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

FORMS = ("fp32", "qat", "ptq")


@dataclass
class Student:
    """The model being compressed, in its current form.

    ``masks`` maps a module path to the bool mask of that module's weight (empty until
    pruned); ``form`` is 'fp32', 'qat' (fake-quantized, trainable) or 'ptq' (calibrated).
    ``freeze_fraction``: in 'qat' form, every training stage freezes observers and BN
    statistics for this last fraction of its epochs.
    """

    model: nn.Module
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    form: str = "fp32"
    freeze_fraction: float = 0.25

    @property
    def quantized(self) -> bool:
        return self.form != "fp32"


def chain(*hooks):
    """Combine ``before_epoch`` hooks (``None`` entries are skipped)."""
    hooks = [h for h in hooks if h is not None]

    def run(epoch: int) -> None:
        for h in hooks:
            h(epoch)

    return run if hooks else None
