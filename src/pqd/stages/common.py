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
    """

    model: nn.Module
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    form: str = "fp32"

    @property
    def quantized(self) -> bool:
        return self.form != "fp32"
