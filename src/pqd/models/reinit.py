"""A fresh random initialisation of a model's architecture (lottery-ticket rewinding, mutual-learning peers,
training a pruned architecture from scratch)."""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["reinitialize"]


def reinitialize(model: nn.Module, *, seed: int) -> nn.Module:
    """A copy of ``model`` with every submodule's ``reset_parameters()`` re-run under ``seed``
    (a fresh random initialisation of the same architecture, on the same device)."""
    fresh = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in fresh.modules():
            reset = getattr(m, "reset_parameters", None)
            if callable(reset):
                reset()
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
    return fresh
