"""Fit a freshly built model to a saved state_dict whose layer shapes differ (after structured
pruning): the generic restore path (:meth:`pqd.rundir.RunDir.restore_student`) calls
:func:`fit_to_state_dict` before ``load_state_dict``.

Minimal version (the structured-pruning work may extend it): Conv2d, Linear and BatchNorm2d
modules whose saved tensors have other shapes are replaced by modules of the saved shapes;
depthwise convolutions (groups == in == out channels) stay depthwise.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def fit_to_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
    """Resize ``model``'s Conv2d/Linear/BatchNorm2d layers in place to the shapes in ``state``;
    return the paths of the resized modules (empty when every shape already fits)."""
    changed = []
    for path, mod in list(model.named_modules()):
        w = state.get(f"{path}.weight")
        if type(mod) is nn.Conv2d and w is not None and tuple(w.shape) != tuple(mod.weight.shape):
            out_c = w.shape[0]
            depthwise = mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels
            groups = out_c if depthwise else mod.groups
            new = nn.Conv2d(w.shape[1] * groups, out_c, mod.kernel_size, stride=mod.stride, padding=mod.padding,
                            dilation=mod.dilation, groups=groups, bias=mod.bias is not None, padding_mode=mod.padding_mode)
        elif type(mod) is nn.Linear and w is not None and tuple(w.shape) != tuple(mod.weight.shape):
            new = nn.Linear(w.shape[1], w.shape[0], bias=mod.bias is not None)
        elif type(mod) is nn.BatchNorm2d and (rm := state.get(f"{path}.running_mean")) is not None and rm.numel() != mod.num_features:
            new = nn.BatchNorm2d(rm.numel(), eps=mod.eps, momentum=mod.momentum, affine=mod.affine,
                                 track_running_stats=mod.track_running_stats)
        else:
            continue
        ref = next(iter(mod.parameters()), None)
        if ref is not None:
            new = new.to(device=ref.device, dtype=ref.dtype)
        _replace(model, path, new)
        changed.append(path)
    return changed
