"""Restore a structurally pruned model without pickling: resize layers to saved tensor shapes.

A student saved after structured pruning has thinner conv/linear/norm layers than the
model its factory builds, and thinner bare parameters and buffers too (a layer-scale
``gamma`` that Torch-Pruning prunes with its channels). :func:`fit_to_state_dict` rebuilds
those in place with the shapes found in a state dict (safetensors), so that
``load_state_dict`` then succeeds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import overload

import torch
from torch import nn

from pqd.errors import CheckpointError

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _new(like: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor:
    if like is None:
        return torch.empty(shape)
    return torch.zeros(shape, dtype=like.dtype, device=like.device)


@overload
def _param(old: torch.Tensor, shape: tuple[int, ...]) -> nn.Parameter: ...
@overload
def _param(old: torch.Tensor | None, shape: tuple[int, ...]) -> nn.Parameter | None: ...
def _param(old: torch.Tensor | None, shape: tuple[int, ...]) -> nn.Parameter | None:
    if old is None:
        return None
    return nn.Parameter(_new(old.data, shape), requires_grad=old.requires_grad)


def fit_to_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """Resize the layers, parameters and buffers of ``model`` (in place) to ``state``'s shapes.

    Conv/Linear/BatchNorm/LayerNorm/GroupNorm modules get their attributes (channel counts,
    groups) updated with their tensors; any other parameter or buffer whose saved shape
    differs (a layer-scale ``gamma``, a user module's own buffer) is replaced by a tensor of
    the saved shape with the same number of dimensions. Only tensors whose saved shape
    differs are touched; values are left for ``load_state_dict``. A depthwise conv
    (``groups == in == out``) stays depthwise; another grouped conv keeps its group count.
    Returns ``model``; a tensor that cannot take its saved shape raises :class:`CheckpointError`.
    """
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        w = state.get(prefix + "weight")
        if w is None:
            if isinstance(m, BATCHNORMS) and (prefix + "running_mean") in state:
                w = state[prefix + "running_mean"]
            else:
                continue
        shape = tuple(w.shape)
        if isinstance(m, CONVS):
            if tuple(m.weight.shape) == shape:
                continue
            if len(shape) != m.weight.dim() or tuple(shape[2:]) != tuple(m.weight.shape[2:]):
                raise CheckpointError(
                    f"{prefix}weight: saved shape {shape} does not fit {type(m).__name__} {tuple(m.weight.shape)}"
                )
            transposed = getattr(m, "transposed", False)
            depthwise = m.groups > 1 and m.groups == m.in_channels == m.out_channels
            if transposed:
                cin, cout_g = shape[0], shape[1]
                groups = cin if depthwise else m.groups
                cout = cout_g * groups
            else:
                cout, cin_g = shape[0], shape[1]
                groups = cout if depthwise else m.groups
                cin = cin_g * groups
            m.in_channels, m.out_channels, m.groups = cin, cout, groups
            m.weight = _param(m.weight, shape)
            if m.bias is not None:
                m.bias = _param(m.bias, (cout,))
        elif isinstance(m, nn.Linear):
            if tuple(m.weight.shape) == shape:
                continue
            m.out_features, m.in_features = shape
            m.weight = _param(m.weight, shape)
            if m.bias is not None:
                m.bias = _param(m.bias, (shape[0],))
        elif isinstance(m, BATCHNORMS):
            n = shape[0]
            if n == m.num_features:
                continue
            m.num_features = n
            if m.affine:
                m.weight, m.bias = _param(m.weight, (n,)), _param(m.bias, (n,))
            if m.track_running_stats:
                m.running_mean = _new(m.running_mean, (n,))
                m.running_var = _new(m.running_var, (n,))
        elif isinstance(m, nn.GroupNorm):
            n = shape[0]
            if n == m.num_channels:
                continue
            if n % m.num_groups:
                raise CheckpointError(
                    f"{prefix}weight: {n} channels do not divide into GroupNorm's {m.num_groups} groups"
                )
            m.num_channels = n
            if m.affine:
                m.weight, m.bias = _param(m.weight, (n,)), _param(m.bias, (n,))
        elif isinstance(m, nn.LayerNorm):
            if tuple(m.normalized_shape) == shape:
                continue
            m.normalized_shape = shape
            if m.elementwise_affine:
                m.weight = _param(m.weight, shape)
                if m.bias is not None:
                    m.bias = _param(m.bias, shape)
    _fit_tensors(model, state)
    return model


def _fit_tensors(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Resize every remaining parameter and buffer whose saved shape differs (same rank only)."""
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        for kind, table in (("parameter", m._parameters), ("buffer", m._buffers)):
            for key, old in list(table.items()):
                saved = state.get(prefix + key)
                if old is None or saved is None or tuple(saved.shape) == tuple(old.shape):
                    continue
                if saved.dim() != old.dim():
                    raise CheckpointError(
                        f"{prefix}{key}: the saved {kind} has shape {tuple(saved.shape)} but {type(m).__name__} builds "
                        f"{tuple(old.shape)} (another number of dimensions, so it was not written by pruning this model's "
                        "channels): check that config.yaml's model is the one this run trained"
                    )
                if kind == "parameter":
                    table[key] = _param(old, tuple(saved.shape))
                else:
                    table[key] = _new(old, tuple(saved.shape))
