"""Architectures from torchvision and timm, by name: ``torchvision:<name>`` and ``timm:<name>``.

The libraries are optional (extras ``torchvision`` / ``timm``) and imported only when such a
name is built. Weights are never downloaded: models start from random initialisation, and a
trained state_dict comes in through ``teacher.weights``. ``width`` (``model.width``) is passed
as ``width_mult`` to the torchvision MobileNets, the only ones with a width multiplier; any
other architecture refuses a width other than 1. These names are architectures of installed
libraries, not user code, so a run folder naming one needs no ``--allow-code``.
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from pqd.config import EXTERNAL_LIBRARIES as LIBRARIES
from pqd.config import is_external  # noqa: F401  (the name users of this module know)
from pqd.errors import ModelError

_WIDTH_ARG = {
    "torchvision": {
        "mobilenet_v2": "width_mult",
        "mobilenet_v3_small": "width_mult",
        "mobilenet_v3_large": "width_mult",
    }
}


def _import(library: str) -> Any:
    try:
        return importlib.import_module(library)
    except ImportError as exc:
        raise ModelError(f"model names '{library}:...' need {library}: pip install 'pqd[{library}]' ({exc})") from None
    except RuntimeError as exc:  # e.g. a torchvision build for another torch: its compiled ops do not load
        raise ModelError(
            f"{library} is installed but cannot be imported ({str(exc)[:200]}); install the {library} "
            "build made for this torch version"
        ) from None


def create_external(
    name: str, *, num_classes: int, width: float = 1.0, dropout: float = 0.0, **kwargs: Any
) -> nn.Module:
    """Build ``torchvision:<arch>`` or ``timm:<arch>`` with ``num_classes`` outputs, randomly initialised."""
    library, _, arch = name.partition(":")
    if library not in LIBRARIES or not arch:
        raise ModelError(f"model {name!r}: expected 'torchvision:<name>' or 'timm:<name>'")
    if dropout:
        raise ModelError(f"model {name!r}: model.dropout is for pqd's built-in models; leave it 0 for {library} models")
    width_arg = _WIDTH_ARG.get(library, {}).get(arch)
    if width != 1.0:
        if width_arg is None:
            raise ModelError(
                f"model {name!r} has no width multiplier; model.width must be 1.0 "
                f"(width multipliers: {', '.join(f'{library}:{a}' for a in _WIDTH_ARG.get(library, {})) or 'none'})"
            )
        kwargs[width_arg] = width
    if library == "torchvision":
        models = _import("torchvision.models")
        known = models.list_models()
        if arch not in known:
            raise ModelError(
                f"torchvision has no model {arch!r}; choose one of torchvision.models.list_models(), e.g. "
                "resnet18, resnet50, mobilenet_v2, mobilenet_v3_small"
            )
        return models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
    timm = _import("timm")
    if not timm.is_model(arch):
        raise ModelError(
            f"timm has no model {arch!r}; choose one of timm.list_models(), e.g. efficientnet_b0, regnetx_002"
        )
    model = timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)
    split_norm_act(model, timm.layers.BatchNormAct2d)
    return model


class NormAct(nn.Sequential):
    """timm's ``BatchNormAct2d`` as three modules: ``nn.BatchNorm2d``, dropout, activation.

    FX traces through ``BatchNormAct2d`` into a functional batch norm with the training flag of
    the moment baked in, so it neither fuses into the convolution nor quantizes; split, the
    batch norm folds into the convolution and the activation is quantized (or listed in
    ``quantization.float_modules``). timm's flat keys (``bn1.weight``) load into it
    (``bn1.0.weight``)."""

    KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

    def __init__(self, src: nn.BatchNorm2d) -> None:
        bn = nn.BatchNorm2d(
            src.num_features,
            eps=src.eps,
            momentum=src.momentum,
            affine=src.affine,
            track_running_stats=src.track_running_stats,
        )
        bn.load_state_dict({k: v for k, v in src.state_dict().items() if k in self.KEYS})
        super().__init__(bn, getattr(src, "drop", nn.Identity()), getattr(src, "act", nn.Identity()))
        self._register_load_state_dict_pre_hook(self._flat_keys)

    def _flat_keys(self, state_dict, prefix, *args) -> None:
        for k in self.KEYS:
            if prefix + k in state_dict:
                state_dict[prefix + "0." + k] = state_dict.pop(prefix + k)


def split_norm_act(model: nn.Module, kind: type) -> int:
    """Replace every module of exactly type ``kind`` (timm's ``BatchNormAct2d``) by :class:`NormAct`;
    returns how many."""
    targets = [name for name, m in model.named_modules() if type(m) is kind]
    for name in targets:
        parent, _, attr = name.rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        setattr(holder, attr, NormAct(getattr(holder, attr)))
    return len(targets)
