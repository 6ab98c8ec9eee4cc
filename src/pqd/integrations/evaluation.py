"""Evaluate any model (FP32, fake-quant, INT8 GraphModule or TorchScript) on the user's own
``DataLoader``, batches used exactly as the loader yields them (its transforms and normalisation)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from pqd.compress.qat import model_device
from pqd.errors import DataError

__all__ = ["evaluate", "predict"]


def predict(model: nn.Module, data: Iterable) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, labels)`` on the CPU over every ``(images, labels, ...)`` batch of ``data``,
    in order; images go to the model's device (the CPU for INT8 and TorchScript models)."""
    device = model_device(model) if isinstance(model, nn.Module) else torch.device("cpu")
    if hasattr(model, "eval"):
        model.eval()
    logits, labels = [], []
    with torch.inference_mode():
        for batch in data:
            if not isinstance(batch, (tuple, list)) or len(batch) < 2 or not isinstance(batch[0], torch.Tensor):
                raise DataError(f"evaluation needs (images, labels) batches of tensors, got {type(batch).__name__}")
            x, y = batch[0], torch.as_tensor(batch[1])
            if not x.is_floating_point():
                raise DataError(
                    f"evaluation feeds images to the model as the loader yields them; got {x.dtype}, the model needs float"
                )
            logits.append(model(x.to(device)).float().cpu())
            labels.append(y.cpu())
    if not logits:
        raise DataError("evaluation got no batches: the data is empty")
    return torch.cat(logits), torch.cat(labels)


def evaluate(model: nn.Module, data: Iterable) -> dict[str, float]:
    """``{"top1": accuracy, "images": n}`` of ``model`` on ``data``."""
    logits, labels = predict(model, data)
    return {"top1": (logits.argmax(1) == labels).float().mean().item(), "images": float(len(labels))}
