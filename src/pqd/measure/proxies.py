"""Cost proxies, to be read beside measured latency and never instead of it.

``proxies(model, input_shape)`` counts parameters, non-zero parameters, dense
multiply-accumulates (MACs) per image, and the MACs that touch a non-zero weight, with
forward hooks on every convolution and linear layer over one batch-1 forward pass.

The last number is what unstructured sparsity removes *in principle*; dense kernels
(fbgemm/oneDNN, ONNX Runtime, OpenVINO) still do every dense MAC, which is why a 90%
sparse model can run no faster than a dense one. Only MACs of Conv/Linear layers are
counted (BatchNorm, activations, pooling and additions are not); padded positions count
as MACs, as in the usual convention. Subclasses (QAT ``ConvBn2d``, ``nn.qat.Linear``...)
are hooked too and their ``weight`` (BN not folded) gives the non-zero count.
"""

from __future__ import annotations

import math

import torch
from torch import nn

_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)


def _layer_macs(m: nn.Linear | nn.modules.conv._ConvNd, inp: torch.Tensor, out: torch.Tensor) -> tuple[int, int]:
    """(dense MACs, MACs on non-zero weights) of one call, per image of the batch."""
    w = m.weight.detach()
    nnz = int(torch.count_nonzero(w))
    batch = max(int(out.shape[0]), 1) if out.dim() > 1 else 1
    if isinstance(m, nn.Linear):
        rows = out.numel() // (m.out_features * batch)  # positions the layer is applied at (1 for [N, F])
        return rows * w.numel(), rows * nnz
    if getattr(m, "transposed", False):  # each input position meets every weight once
        positions = math.prod(inp.shape[2:])
    else:  # each output position meets every weight once
        positions = math.prod(out.shape[2:])
    return positions * w.numel(), positions * nnz


def proxies(model: nn.Module, input_shape: tuple[int, ...], *, per_layer: bool = False) -> dict:
    """Parameter and MAC counts of ``model`` for one image of ``input_shape`` (C, H, W).

    Returns ``params``, ``nonzero_params`` (exact zeros excluded; a pruned weight is an exact
    zero), ``macs`` (dense, per image), ``nonzero_macs`` and ``nonzero_mac_fraction``; with
    ``per_layer`` also a list of per-layer records. The model is run once in eval mode on
    zeros and left in eval mode.
    """
    params = sum(p.numel() for p in model.parameters())
    nonzero = sum(int(torch.count_nonzero(p.detach())) for p in model.parameters())
    layers: list[dict] = []
    handles = []

    def hook(name: str):
        def fn(m: nn.Linear | nn.modules.conv._ConvNd, args, out) -> None:
            dense, nz = _layer_macs(m, args[0], out)
            layers.append({"layer": name, "type": type(m).__name__, "macs": dense, "nonzero_macs": nz})

        return fn

    for name, m in model.named_modules():
        if isinstance(m, _LAYERS) and isinstance(getattr(m, "weight", None), torch.Tensor):
            handles.append(m.register_forward_hook(hook(name)))
    device = next(iter(model.parameters()), torch.empty(0)).device
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        for h in handles:
            h.remove()
    macs = sum(r["macs"] for r in layers)
    nz_macs = sum(r["nonzero_macs"] for r in layers)
    out = {
        "params": params,
        "nonzero_params": nonzero,
        "macs": macs,
        "nonzero_macs": nz_macs,
        "nonzero_mac_fraction": nz_macs / macs if macs else None,
    }
    if per_layer:
        out["layers"] = layers
    return out
