"""INT8 quantization for x86 CPUs: QAT or static PTQ, then conversion to integer kernels.

Scheme: per-channel symmetric int8 weights, per-tensor affine uint8 activations (full 8-bit
range by default; ``reduce_range`` for CPUs without VNNI), Conv+BN(+ReLU) fused with BN folded
(simulated during QAT, real at conversion). Observers and BN statistics are frozen for the
last ``freeze_fraction`` of QAT epochs. Pruning masks stay enforced: the fake-quantized
weight of a zero is exactly zero (symmetric scheme, zero point 0), so pruned positions are
zero in the final INT8 weights too.

Why the FX graph-mode flow (``torch.ao.quantization.quantize_fx``) and not torchao's PT2E
flow: measured on this project's 2-core AVX-512 VNNI machine with torch 2.13 / torchao 0.18
(``python benchmarks/quant_flow.py``), the FX-converted model, TorchScript-frozen, runs
ResNet-18 (CIFAR) at batch 1 in about 1.0 ms against 2.5 ms for PT2E + Inductor, which also
costs ~17 s of compilation on every load and needs a C++ toolchain on the deployment host.
The FX flow's integer modules run on fbgemm/oneDNN kernels directly. Revisit when PT2E's
CPU path catches up; the benchmark prints both.
"""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from pqd.config import QuantizeConfig, TrainConfig
from pqd.data import Splits, batches
from pqd.errors import ModelError
from pqd.stages.common import Student
from pqd.train.loop import apply_masks, train

log = logging.getLogger("pqd.quantize")
BACKEND = "x86"


def _fx():
    torch.backends.quantized.engine = BACKEND
    warnings.filterwarnings("ignore", message=".*migrate to use torchao.*")
    warnings.filterwarnings("ignore", category=UserWarning, module="torch.ao.quantization")
    warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
    from torch.ao import quantization as tq
    from torch.ao.quantization import quantize_fx

    return tq, quantize_fx


def qconfig_mapping(mode: str = "qat", *, reduce_range: bool = False):
    """PyTorch's x86 mapping with the global activation range set by ``reduce_range``.

    PyTorch's default (``reduce_range=True``) simulates 7-bit activations so that u8×s8
    pairs cannot saturate 16-bit accumulators on CPUs without VNNI; the integer kernels
    then still produce full 8-bit outputs, so the fake-quant model and the INT8 model
    clamp differently and disagree on a few percent of predictions. With VNNI (32-bit
    accumulation) the full range is safe, so pqd's default is ``False``.
    """
    tq, _ = _fx()
    from torch.ao.quantization import fake_quantize as fq
    from torch.ao.quantization import observer as ob

    if mode == "qat":
        mapping = tq.get_default_qat_qconfig_mapping(BACKEND)
        act = fq.FusedMovingAvgObsFakeQuantize.with_args(
            observer=ob.MovingAverageMinMaxObserver, quant_min=0, quant_max=255, reduce_range=reduce_range)
        weight = fq.default_fused_per_channel_wt_fake_quant
    else:
        mapping = tq.get_default_qconfig_mapping(BACKEND)
        act = ob.HistogramObserver.with_args(reduce_range=reduce_range)
        weight = ob.PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    return mapping.set_global(tq.QConfig(activation=act, weight=weight))


def prepare(model: nn.Module, example: torch.Tensor, *, mode: str = "qat", reduce_range: bool = False) -> nn.Module:
    """Return a fake-quant (``qat``) or observer (``ptq``) copy of ``model``; the input is untouched."""
    tq, qfx = _fx()
    model = copy.deepcopy(model).cpu()
    mapping = qconfig_mapping(mode, reduce_range=reduce_range)
    try:
        if mode == "qat":
            return qfx.prepare_qat_fx(model.train(), mapping, (example,))
        return qfx.prepare_fx(model.eval(), mapping, (example,))
    except Exception as exc:  # torch.fx raises many types for untraceable code
        culprit = _untraceable_submodule(model)
        where = f" The first module that cannot be traced on its own is {culprit[0]!r} ({culprit[1]})." if culprit else ""
        raise ModelError(
            f"cannot quantize {type(model).__name__}: torch.fx could not trace it ({type(exc).__name__}: {str(exc)[:300]}).{where} "
            "Make forward() free of data-dependent Python control flow, or wrap the offending submodule in a leaf module."
        ) from None


def _untraceable_submodule(model: nn.Module) -> tuple[str, str] | None:
    """``(path, class name)`` of the innermost user-defined submodule torch.fx fails to trace alone."""
    failing = []
    for name, sub in model.named_modules():
        if name and not type(sub).__module__.startswith("torch."):
            try:
                torch.fx.symbolic_trace(sub)
            except Exception:
                failing.append((name, type(sub).__name__))
    innermost = [f for f in failing if not any(g[0].startswith(f[0] + ".") for g in failing)]
    return innermost[0] if innermost else None


def freeze(model: nn.Module) -> None:
    """Stop observers and BN statistics: the model then trains and evaluates exactly as it converts."""
    tq, _ = _fx()
    model.apply(tq.disable_observer)
    model.apply(torch.ao.nn.intrinsic.qat.freeze_bn_stats)


def unfreeze(model: nn.Module) -> None:
    tq, _ = _fx()
    model.apply(tq.enable_observer)
    model.apply(torch.ao.nn.intrinsic.qat.update_bn_stats)


def qat_epoch_hook(student: Student, epochs: int):
    """``before_epoch`` hook for any stage that trains a fake-quant student: observers and BN
    statistics update until the last ``student.freeze_fraction`` of the epochs, then freeze.

    Frozen BN removes the scale invariance that BN gives the weights, so training with it
    frozen tolerates only a small learning rate; the cosine schedule's tail provides one.
    """
    if student.form != "qat":
        return None
    freeze_from = epochs - int(round(student.freeze_fraction * epochs))

    def hook(epoch: int) -> None:
        (freeze if epoch >= freeze_from else unfreeze)(student.model)

    return hook


def quantize(
    student: Student, config: QuantizeConfig, *, data: Splits, epochs: int, train_config: TrainConfig = TrainConfig(),
    checkpoint: str | Path | None = None, seed: int = 0, augment: bool = True,
) -> Student:
    """QAT for ``epochs`` (``config.mode == 'qat'``) or static calibration (``'ptq'``)."""
    if student.quantized:
        raise ModelError("the student is already quantized; quantize runs once per pipeline")
    example = torch.zeros(2, *data.image_shape)
    model = prepare(student.model, example, mode=config.mode, reduce_range=config.reduce_range)
    masks = dict(student.masks)
    apply_masks(model, masks)
    if config.mode == "ptq":
        calibrate(model, data, config.calibration_batches, train_config.batch_size)
        # PTQ observers have no off switch: convert before running it on anything else.
        return Student(model, masks, "ptq")
    out = Student(model, masks, "qat", config.freeze_fraction)
    train(model, data, epochs=epochs, lr=config.lr, config=train_config, masks=masks, before_epoch=qat_epoch_hook(out, epochs),
          checkpoint=checkpoint, seed=seed, tag="quantize", amp=False, augment=augment)
    # Observers left on would keep re-estimating ranges on every later forward, evaluation
    # included, so the model would drift from what conversion sees: a stage ends frozen.
    freeze(model)
    return out


def calibrate(model: nn.Module, data: Splits, n_batches: int, batch_size: int) -> None:
    model.eval()
    with torch.no_grad():
        for i, (x, _) in enumerate(batches(data.train, batch_size=batch_size, mean=data.mean, std=data.std)):
            if i >= n_batches:
                break
            model(x)


def convert(student: Student) -> nn.Module:
    """Convert a quantized student to a real INT8 model that runs on x86 integer kernels."""
    if not student.quantized:
        raise ModelError("convert needs a quantized student (run the quantize stage first)")
    _, qfx = _fx()
    model = copy.deepcopy(student.model).cpu().eval()
    apply_masks(model, student.masks)
    return qfx.convert_fx(model)


def to_torchscript(int8_model: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    """Trace and freeze for deployment: freezing is worth 1.1-1.45x over the eager graph."""
    with torch.no_grad():
        return torch.jit.freeze(torch.jit.trace(int8_model.eval(), example))


_DEQUANTIZE = {"dequantize", torch.dequantize}
_QUANTIZE = {torch.quantize_per_tensor, torch.quantize_per_channel, torch.quantize_per_tensor_dynamic}
_SHAPE_ONLY = {"size", "dim"}


def float_modules(int8_model: nn.Module) -> list[dict[str, str]]:
    """Operations that stay FP32 inside a converted model: the x86 backend has no integer kernel
    (or no quantization pattern) for them, so FX dequantizes before and quantizes after them.

    Returns ``[{"name": module path or graph node name, "type": module class or function name}]``
    in graph order. The final dequantize that hands float logits to the caller is not counted.
    """
    graph = getattr(int8_model, "graph", None)
    if graph is None:
        return []
    modules = dict(int8_model.named_modules())
    floating, out = set(), []
    for node in graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        if node.target in _DEQUANTIZE:
            floating.add(node)
        elif node.target not in _QUANTIZE and node.target not in _SHAPE_ONLY and any(a in floating for a in node.all_input_nodes):
            floating.add(node)
            if node.op == "call_module":
                out.append({"name": str(node.target), "type": type(modules[node.target]).__name__})
            else:
                out.append({"name": node.name, "type": getattr(node.target, "__name__", str(node.target))})
    return out
