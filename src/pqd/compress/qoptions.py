"""Quantization options: weight granularity, weight symmetry, and dynamic (weights-only) PTQ.

pqd's default INT8 scheme (:mod:`pqd.compress.qat`) is per-channel symmetric int8 weights. This module
builds the weight observers / fake-quantizers for the other choices, and the qconfig mapping
of dynamic quantization:

* ``granularity``: ``'per_channel'`` (one scale per output channel) or ``'per_tensor'`` (one
  scale per layer). Per-tensor scales are set by the layer's largest weight, so channels of
  small weights lose resolution; kernels and files are the same size either way.
* ``symmetric``: ``True`` maps ``[-max|w|, max|w|]`` onto int8 with zero point 0, so a pruned
  (zero) weight is the integer 0 and the compact file can skip it; ``False`` (affine) maps
  ``[min w, max w]`` with a zero point, which uses the 256 levels of a skewed weight
  distribution fully but stores zeros as the zero point (not 0), so pruned positions are no
  longer zeros in the INT8 weights (``sparsity.achieved_int8`` shows it).
* ``mode='dynamic'``: weights-only PTQ of the ``nn.Linear`` layers (activations are quantized
  at run time, per batch, by the kernel); every other layer stays FP32. No calibration data is
  needed. On conv nets almost all time is spent in convolutions, which stay FP32.

Activations (static modes) stay per-tensor affine uint8 whatever the weight options.
The measured trade-offs are in docs/QUANTIZATION.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from pqd.errors import ModelError

if TYPE_CHECKING:  # imported lazily at run time (torch.ao.quantization warns on import)
    from torch.ao.quantization import QConfigMapping

__all__ = [
    "GRANULARITIES",
    "MODES",
    "QuantOptions",
    "dynamic_qconfig_mapping",
    "quant_options",
    "weight_fake_quant",
    "weight_observer",
]

MODES = ("qat", "ptq", "dynamic")
GRANULARITIES = ("per_channel", "per_tensor")


@dataclass(frozen=True)
class QuantOptions:
    """Weight quantization choices (see the module doc)."""

    granularity: str = "per_channel"
    symmetric: bool = True

    def __post_init__(self):
        if self.granularity not in GRANULARITIES:
            raise ModelError(f"weight granularity must be one of {GRANULARITIES}, got {self.granularity!r}")

    @property
    def qscheme(self) -> torch.qscheme:
        if self.granularity == "per_channel":
            return torch.per_channel_symmetric if self.symmetric else torch.per_channel_affine
        return torch.per_tensor_symmetric if self.symmetric else torch.per_tensor_affine

    @property
    def default(self) -> bool:
        return self == QuantOptions()

    def label(self) -> str:
        """'per_channel/symmetric' etc., for records and tables."""
        return f"{self.granularity}/{'symmetric' if self.symmetric else 'affine'}"


def weight_observer(options: QuantOptions = QuantOptions()):
    """PTQ weight observer constructor (int8, ``[-128, 127]``) for ``options``."""
    from torch.ao.quantization import observer as ob

    cls = ob.PerChannelMinMaxObserver if options.granularity == "per_channel" else ob.MinMaxObserver
    return cls.with_args(dtype=torch.qint8, qscheme=options.qscheme)


def weight_fake_quant(options: QuantOptions = QuantOptions()):
    """QAT weight fake-quantizer constructor for ``options`` (moving-average min/max, int8)."""
    from torch.ao.quantization import fake_quantize as fq
    from torch.ao.quantization import observer as ob

    if options.default:
        return fq.default_fused_per_channel_wt_fake_quant
    per_channel = options.granularity == "per_channel"
    obs = ob.MovingAveragePerChannelMinMaxObserver if per_channel else ob.MovingAverageMinMaxObserver
    kwargs = {"ch_axis": 0} if per_channel else {}
    return fq.FusedMovingAvgObsFakeQuantize.with_args(
        observer=obs, quant_min=-128, quant_max=127, dtype=torch.qint8, qscheme=options.qscheme, **kwargs
    )


def dynamic_qconfig_mapping(options: QuantOptions = QuantOptions()) -> QConfigMapping:
    """Dynamic PTQ: int8 weights for ``nn.Linear`` only (activations quantized at run time);
    everything else stays FP32."""
    from torch import nn
    from torch.ao import quantization as tq
    from torch.ao.quantization import observer as ob

    act = ob.PlaceholderObserver.with_args(dtype=torch.quint8, quant_min=0, quant_max=255, is_dynamic=True)
    qconfig = tq.QConfig(activation=act, weight=weight_observer(options))
    return tq.QConfigMapping().set_object_type(nn.Linear, qconfig)


def quant_options(config) -> QuantOptions:
    """The weight options of a ``quantize`` config section (:class:`pqd.stages.quantize.QuantizeConfig`)."""
    return QuantOptions(
        granularity=getattr(config, "granularity", "per_channel"), symmetric=getattr(config, "symmetric", True)
    )
