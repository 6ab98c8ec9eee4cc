from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pqd.data import Dataset, batches
from pqd.data.stream import FileDataset


def predict(
    model: Callable[[torch.Tensor], torch.Tensor], ds: Dataset | FileDataset, *, mean, std, batch_size: int = 500
) -> torch.Tensor:
    """Logits of ``model`` (a module in eval mode, or any callable) on every image of ``ds``, in order, on CPU."""
    if isinstance(model, nn.Module):
        model.eval()
    device = (
        next(iter(model.parameters()), torch.empty(0)).device if isinstance(model, nn.Module) else torch.device("cpu")
    )
    out = []
    with torch.inference_mode():
        for x, _ in batches(ds, batch_size=batch_size, mean=mean, std=std, device=device):
            out.append(model(x).float().cpu())
    return torch.cat(out)


def top1(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(1) == y).float().mean().item()


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of images on which two models' top-1 predictions agree."""
    return (a.argmax(1) == b.argmax(1)).float().mean().item()
