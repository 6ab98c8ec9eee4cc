"""INT8 quantization primitives for x86 CPUs: FX graph-mode QAT / PTQ that keep the model's device.

Scheme: per-channel symmetric int8 weights, per-tensor affine uint8 activations (full 8-bit
range by default; ``reduce_range`` for CPUs without VNNI), Conv+BN(+ReLU) fused with BN folded
(simulated during QAT, real at conversion). The fake-quantized weight of a zero is exactly
zero (symmetric scheme, zero point 0), so pruned positions stay zero in the INT8 weights.

* :func:`prepare_qat` / :func:`prepare_ptq` return a fake-quant / observer copy of the model
  **on the model's own device** (the input model is untouched, and never moved);
* :func:`calibrate` runs PTQ observers over any iterable of images or ``(images, labels)``;
* :func:`freeze` / :func:`unfreeze` stop / restart observers and BN statistics;
* :func:`convert` turns a prepared model into a real INT8 ``GraphModule`` on the CPU (the
  x86 integer kernels run there); :func:`to_torchscript` traces and freezes it for deployment.

Why the FX flow and not torchao's PT2E flow: see docs/BENCHMARKS.md (``benchmarks/quant_flow.py``);
the FX-converted model runs on fbgemm/oneDNN integer kernels directly, with no compilation at load.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import math
import os
import types
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pqd.compress.qoptions import MODES, QuantOptions, dynamic_qconfig_mapping, weight_fake_quant, weight_observer
from pqd.compress.sparsity import as_masks
from pqd.errors import CollapseWarning, FrozenBranchWarning, ModelError

if TYPE_CHECKING:  # imported at run time only after fx_modules() has set the engine and silenced torch's warnings
    from torch.ao.quantization import QConfigMapping
    from torch.ao.quantization.backend_config import BackendConfig
    from torch.ao.quantization.fx.custom_config import PrepareCustomConfig

__all__ = [
    "BACKEND",
    "FreezeCheck",
    "backend_config",
    "calibrate",
    "convert",
    "float_modules",
    "freeze",
    "frozen",
    "fx_modules",
    "model_device",
    "prepare",
    "prepare_ptq",
    "prepare_qat",
    "qconfig_mapping",
    "to_torchscript",
    "trace",
    "unfreeze",
]

BACKEND = "x86"


def fx_modules() -> tuple[types.ModuleType, types.ModuleType]:
    """``(torch.ao.quantization, torch.ao.quantization.quantize_fx)`` with the x86 engine selected
    and torch's migration warnings silenced."""
    torch.backends.quantized.engine = BACKEND
    warnings.filterwarnings("ignore", message=".*migrate to use torchao.*")
    warnings.filterwarnings("ignore", category=UserWarning, module="torch.ao.quantization")
    warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
    from torch.ao import quantization as tq
    from torch.ao.quantization import quantize_fx

    return tq, quantize_fx


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (or buffer); CPU for a model without tensors."""
    for t in model.parameters():
        return t.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def qconfig_mapping(
    mode: str = "qat", *, reduce_range: bool = False, options: QuantOptions | None = None
) -> QConfigMapping:
    """PyTorch's x86 mapping with the global activation range set by ``reduce_range``.

    PyTorch's default (``reduce_range=True``) simulates 7-bit activations so that u8×s8
    pairs cannot saturate 16-bit accumulators on CPUs without VNNI; the integer kernels
    then still produce full 8-bit outputs, so the fake-quant model and the INT8 model
    clamp differently and disagree on a few percent of predictions. With VNNI (32-bit
    accumulation) the full range is safe, so pqd's default is ``False``.

    ``options`` (:class:`pqd.compress.qoptions.QuantOptions`): weight granularity and symmetry (default
    per-channel symmetric). Mode ``'dynamic'``: weights-only int8 for ``nn.Linear`` layers.
    """
    if mode not in MODES:
        raise ModelError(f"quantization mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
    options = options or QuantOptions()
    tq, _ = fx_modules()
    if mode == "dynamic":
        return dynamic_qconfig_mapping(options)
    from torch.ao.quantization import fake_quantize as fq
    from torch.ao.quantization import observer as ob

    if mode == "qat":
        mapping: QConfigMapping = tq.get_default_qat_qconfig_mapping(BACKEND)
        act = fq.FusedMovingAvgObsFakeQuantize.with_args(
            observer=ob.MovingAverageMinMaxObserver, quant_min=0, quant_max=255, reduce_range=reduce_range
        )
        weight = weight_fake_quant(options)
    else:
        mapping = tq.get_default_qconfig_mapping(BACKEND)
        act = ob.HistogramObserver.with_args(reduce_range=reduce_range)
        weight = weight_observer(options)
    return mapping.set_global(tq.QConfig(activation=act, weight=weight))


def backend_config() -> BackendConfig:
    """PyTorch's native backend config (what FX uses when given none: it quantizes LayerNorm and
    GroupNorm, which the x86 config leaves in float), plus ``nn.Flatten`` and ``Tensor.flatten`` as
    shape ops.

    It already lets ``torch.flatten``, ``view`` and ``reshape`` pass a quantized tensor through
    (the output shares its input's scale and zero point); the module and method spellings of the
    same flatten are missing, so FX would wrap them in a dequantize/quantize pair and run them in
    float. Every prepare and convert of pqd uses this config.
    """
    from torch.ao.quantization.backend_config import BackendPatternConfig
    from torch.ao.quantization.backend_config.native import get_native_backend_config

    fx_modules()  # imports the backend_config package whole (its utils module)
    config = get_native_backend_config()
    shape_op = next(c for c in config.configs if c.pattern == "reshape")
    for pattern in (nn.Flatten, "flatten"):
        config.set_backend_pattern_config(
            BackendPatternConfig(pattern)
            .set_observation_type(shape_op.observation_type)
            .set_dtype_configs(shape_op.dtype_configs)
        )
    return config


def _leaf_config(leaf_modules: Sequence[str]) -> PrepareCustomConfig | None:
    """FX PrepareCustomConfig marking ``leaf_modules`` untraceable (kept whole, left FP32):
    entries 'package.module:Class' name classes (imported), others submodule paths ('layer3.0')."""
    if not leaf_modules:
        return None
    import importlib

    from torch.ao.quantization.fx.custom_config import PrepareCustomConfig

    names, classes = [], []
    for entry in leaf_modules:
        mod, sep, attr = str(entry).partition(":")
        if not sep:
            names.append(str(entry))
            continue
        try:
            cls = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as exc:
            raise ModelError(
                f"quantize.leaf_modules: {entry!r} cannot be imported ({type(exc).__name__}: {exc})"
            ) from None
        if not isinstance(cls, type):
            raise ModelError(f"quantize.leaf_modules: {entry!r} is not a class")
        classes.append(cls)
    return PrepareCustomConfig().set_non_traceable_module_names(names).set_non_traceable_module_classes(classes)


def prepare(
    model: nn.Module,
    example: torch.Tensor,
    *,
    mode: str = "qat",
    reduce_range: bool = False,
    options: QuantOptions | None = None,
    inplace: bool = False,
    leaf_modules: Sequence[str] = (),
    float_modules: Sequence[str] = (),
) -> nn.Module:
    """A fake-quant (``qat``, train mode) or observer (``ptq`` / ``dynamic``, eval mode) copy of
    ``model`` on ``model``'s device. ``model`` itself is neither changed nor moved.

    ``inplace=True`` skips the copy: the result then shares ``model``'s parameter objects, so an
    optimizer built on ``model`` keeps training the prepared model (use the result, not ``model``).
    ``leaf_modules``: submodules torch.fx must not trace into (paths like 'layer3.0' or classes
    'package.module:Class'); they stay FP32 inside the INT8 model.
    ``float_modules``: submodule paths traced but not quantized (no qconfig: they run in FP32
    between a dequantize and a quantize), the per-layer fallback of a layer too sensitive to INT8.
    """
    _, qfx = fx_modules()
    custom = _leaf_config(leaf_modules)
    device = model_device(model)
    mapping = qconfig_mapping(mode, reduce_range=reduce_range, options=options)
    names = dict(model.named_modules())
    for name in float_modules:
        if name not in names or not name:
            raise ModelError(
                f"quantize.float_modules: {name!r} is not a submodule path of {type(model).__name__} "
                "(paths as in model.named_modules(), e.g. 'layer1.0.conv1')"
            )
        mapping.set_module_name(name, None)
    backend = backend_config()
    if not inplace:
        model = copy.deepcopy(model)  # FX fusion shares parameters with its input: keep the caller's model intact
    example = example.to(device)
    try:
        if mode == "qat":
            prepared = qfx.prepare_qat_fx(
                model.train(), mapping, (example,), prepare_custom_config=custom, backend_config=backend
            )
        else:
            prepared = qfx.prepare_fx(
                model.eval(), mapping, (example,), prepare_custom_config=custom, backend_config=backend
            )
    except Exception as exc:  # torch.fx raises many types for untraceable code
        culprit = _untraceable_submodule(model)
        where = (
            f" The first module that cannot be traced on its own is {culprit[0]!r} ({culprit[1]})." if culprit else ""
        )
        raise ModelError(
            f"cannot quantize {type(model).__name__}: torch.fx could not trace it ({type(exc).__name__}: {str(exc)[:300]}).{where} "
            "Make forward() free of data-dependent Python control flow, or keep the offending submodule whole (it stays FP32): "
            "in Python pass leaf_modules=['<its path>'] or ['package.module:Class'] to prepare/prepare_qat/prepare_ptq; "
            "in a run config set quantize.leaf_modules: [...] (--set 'quantize.leaf_modules=[...]')."
        ) from None
    # FX creates the observers / fake-quant modules it inserts on the CPU: bring them to the model.
    on_device: nn.Module = prepared.to(device)
    return on_device


def prepare_qat(
    model: nn.Module,
    example: torch.Tensor,
    *,
    reduce_range: bool = False,
    inplace: bool = False,
    leaf_modules: Sequence[str] = (),
    float_modules: Sequence[str] = (),
) -> nn.Module:
    """A trainable fake-quant copy of ``model`` on the same device (observers on); see :func:`prepare`
    (``leaf_modules``: submodules kept whole and FP32, as ``quantize.leaf_modules`` in a run config;
    ``float_modules``: traced but left FP32, as ``quantize.float_modules``)."""
    return prepare(
        model,
        example,
        mode="qat",
        reduce_range=reduce_range,
        inplace=inplace,
        leaf_modules=leaf_modules,
        float_modules=float_modules,
    )


def prepare_ptq(
    model: nn.Module,
    example: torch.Tensor,
    *,
    reduce_range: bool = False,
    leaf_modules: Sequence[str] = (),
    float_modules: Sequence[str] = (),
) -> nn.Module:
    """An observer copy of ``model`` on the same device, to :func:`calibrate` then :func:`convert`
    (``leaf_modules`` and ``float_modules`` as in :func:`prepare_qat`)."""
    return prepare(
        model, example, mode="ptq", reduce_range=reduce_range, leaf_modules=leaf_modules, float_modules=float_modules
    )


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


def calibrate(model: nn.Module, data: Iterable[Any], *, num_batches: int | None = None) -> nn.Module:
    """Run ``model`` (eval mode, no grad) over ``data`` so its PTQ observers see real activations.

    ``data`` is any iterable of image batches or ``(images, labels, ...)`` tuples/lists, e.g. a
    ``torch.utils.data.DataLoader`` yielding normalised float images; each batch is moved to the
    model's device. Stops after ``num_batches`` batches when given.
    """
    device = model_device(model)
    model.eval()
    n = 0
    with torch.no_grad():
        for batch in data:
            if num_batches is not None and n >= num_batches:
                break
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            if not isinstance(x, torch.Tensor) or not x.is_floating_point():
                got = type(x).__name__ if not isinstance(x, torch.Tensor) else f"a {x.dtype} tensor"
                raise ModelError(
                    f"calibrate needs batches of float image tensors (normalised as in training), got {got}"
                )
            model(x.to(device))
            n += 1
    if n == 0:
        raise ModelError("calibrate got no batches: the data iterable is empty")
    return model


def freeze(model: nn.Module) -> nn.Module:
    """Stop observers and BN statistics: the model then trains and evaluates exactly as it converts."""
    tq, _ = fx_modules()
    model.apply(tq.disable_observer)
    model.apply(torch.ao.nn.intrinsic.qat.freeze_bn_stats)
    return model


def unfreeze(model: nn.Module) -> nn.Module:
    """Restart observers and BN statistics."""
    tq, _ = fx_modules()
    model.apply(tq.enable_observer)
    model.apply(torch.ao.nn.intrinsic.qat.update_bn_stats)
    return model


class FreezeCheck:
    """Held-out accuracy and loss of a fake-quant model from the moment its observers and BN
    statistics freeze: :meth:`start` freezes and measures, :meth:`finish` measures again and
    returns a message when training since has collapsed the model (accuracy fell by more than
    ``max_drop``, or the loss became non-finite), else None.

    Frozen BN statistics take away the scale invariance BN gives the weights, so a learning rate
    that was safe before freezing can wreck the model after it; this catches that at the boundary.
    ``held_out``: ``(images, labels)`` the model does not train on, already as the model takes them.
    """

    def __init__(
        self,
        model: nn.Module,
        held_out: tuple[torch.Tensor, torch.Tensor],
        *,
        max_drop: float = 0.1,
        advice: str = "lower the learning rate after freeze() (a tenth is a good start), or keep training with "
        "observers and BN statistics live and freeze only for the last steps",
    ) -> None:
        self.model, self.max_drop, self.advice = model, max_drop, advice
        self.x, self.y = held_out
        self.before: tuple[float, float] | None = None
        self.after: tuple[float, float] | None = None

    def measure(self) -> tuple[float, float]:
        """``(top-1, cross-entropy)`` of the model on the held-out batch, in eval mode."""
        was = self.model.training
        self.model.eval()
        device = model_device(self.model)
        with torch.no_grad():
            logits = self.model(self.x.to(device)).float()
            y = self.y.to(logits.device)
            result = float((logits.argmax(1) == y).float().mean()), float(torch.nn.functional.cross_entropy(logits, y))
        self.model.train(was)
        return result

    def start(self) -> FreezeCheck:
        freeze(self.model)
        self.before = self.measure()
        return self

    def finish(self) -> str | None:
        if self.before is None:
            raise RuntimeError("FreezeCheck.finish() before start()")
        self.after = self.measure()
        (acc0, loss0), (acc1, loss1) = self.before, self.after
        if acc0 - acc1 <= self.max_drop and math.isfinite(loss1):
            return None
        return (
            f"training after freezing observers and BN statistics collapsed the model: held-out accuracy "
            f"{100 * acc0:.1f}% -> {100 * acc1:.1f}%, loss {loss0:.3f} -> {loss1:.3f}; {self.advice}"
        )


@contextlib.contextmanager
def frozen(
    model: nn.Module, held_out: tuple[torch.Tensor, torch.Tensor], *, max_drop: float = 0.1
) -> Iterator[FreezeCheck]:
    """Freeze ``model`` (:func:`freeze`) for the block and warn (:class:`pqd.errors.CollapseWarning`)
    when training inside it collapsed the model on ``held_out`` (:class:`FreezeCheck`)."""
    check = FreezeCheck(model, held_out, max_drop=max_drop).start()
    yield check
    message = check.finish()
    if message:
        warnings.warn(message, CollapseWarning, stacklevel=3)


def convert(model: nn.Module, *, masks: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """A real INT8 copy of a prepared (QAT or calibrated PTQ) model, on the CPU where the x86
    integer kernels run; ``masks`` are re-applied first. ``model`` is neither changed nor moved."""
    if not hasattr(model, "graph") or not any(_is_fake_quant_or_observer(m) for m in model.modules()):
        raise ModelError("convert needs a model from prepare_qat/prepare_ptq (run the quantize stage first)")
    _, qfx = fx_modules()
    copy_ = copy.deepcopy(model).cpu().eval()
    if masks:
        as_masks(copy_, {k: v.cpu() for k, v in masks.items()}).apply()
    return _flatten_quantized(qfx.convert_fx(copy_, backend_config=backend_config()))


def _flatten_quantized(int8_model: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Run ``nn.Flatten`` / ``Tensor.flatten`` on the quantized tensor.

    :func:`backend_config` makes their output share the input's scale and zero point, but FX's
    lowering knows only ``torch.flatten`` as a pass-through op and leaves the others as
    ``dequantize -> flatten -> quantize`` with those same qparams: a float round trip that
    changes no value. Flatten takes a quantized tensor as it is, so the pair is dropped.
    """
    modules = dict(int8_model.named_modules())
    graph, changed = int8_model.graph, False
    for node in list(graph.nodes):
        flat = (node.op == "call_method" and node.target == "flatten") or (
            node.op == "call_module" and isinstance(modules.get(node.target), nn.Flatten)
        )
        if not flat or not node.args:
            continue
        source, users = node.args[0], list(node.users)
        if not (
            isinstance(source, torch.fx.Node)
            and source.target in _DEQUANTIZE
            and len(users) == 1
            and users[0].target is torch.quantize_per_tensor
        ):
            continue
        node.replace_input_with(source, source.args[0])
        users[0].replace_all_uses_with(node)
        graph.erase_node(users[0])
        changed = True
    if changed:
        graph.eliminate_dead_code()
        int8_model.recompile()
    return int8_model


def _is_fake_quant_or_observer(m: nn.Module) -> bool:
    from torch.ao.quantization import FakeQuantizeBase, ObserverBase

    return isinstance(m, (FakeQuantizeBase, ObserverBase))


def to_torchscript(int8_model: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    """Trace and freeze for deployment (freezing folds constants and inlines the integer ops)."""
    with torch.no_grad():
        frozen_model: torch.jit.ScriptModule = torch.jit.freeze(
            trace(int8_model.eval(), example)
        )  # freeze is untyped in torch
    return frozen_model


log = logging.getLogger("pqd.qat")
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


def trace(model: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    """``torch.jit.trace``, with each of PyTorch's TracerWarnings (data-dependent control flow or
    values frozen into the trace) reissued as a :class:`pqd.errors.FrozenBranchWarning` that names
    the submodule whose code caused it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced: torch.jit.ScriptModule = torch.jit.trace(model, example)  # trace is untyped in torch
    seen = set()
    for w in caught:
        if not issubclass(w.category, torch.jit.TracerWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            continue
        if os.path.abspath(w.filename).startswith(_TORCH_DIR):
            # raised inside torch's own operators (a quantized op reading a scale as a float, say), not by
            # a branch of the model's code: nothing the user can rewrite, and the traced graph is exact
            log.debug("TorchScript tracing warning from inside torch (%s:%s): %s", w.filename, w.lineno, w.message)
            continue
        name, cls = _module_at(model, w.filename, w.lineno)
        if (name, w.filename, w.lineno) in seen:
            continue
        seen.add((name, w.filename, w.lineno))
        where = f"module {name!r} ({cls})" if name is not None else "the model"
        warnings.warn(
            f"tracing for TorchScript froze data-dependent control flow in {where} at {os.path.basename(w.filename)}:{w.lineno}: "
            f"the saved model always takes the branch the example input took ({str(w.message).splitlines()[0][:160]}). "
            "Write that code with tensor operations (torch.where) instead of Python if/loops on tensor values, "
            "or check the deployed model's outputs on real inputs",
            FrozenBranchWarning,
            stacklevel=2,
        )
    return traced


def _module_at(model: nn.Module, filename: str, lineno: int) -> tuple[str | None, str | None]:
    """``(path, class name)`` of the deepest submodule whose ``forward`` source holds ``filename:lineno``."""
    found: tuple[str | None, str | None] = (None, None)
    depth = -1
    for name, module in model.named_modules():
        forward = type(module).forward
        try:
            lines, start = inspect.getsourcelines(forward)
            source = inspect.getsourcefile(forward)
        except (OSError, TypeError):
            continue
        inside = (
            source and os.path.abspath(source) == os.path.abspath(filename) and start <= lineno < start + len(lines)
        )
        if inside and len(name) > depth:
            found, depth = (name or type(module).__name__, type(module).__name__), len(name)
    return found


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
        elif (
            node.target not in _QUANTIZE
            and node.target not in _SHAPE_ONLY
            and any(a in floating for a in node.all_input_nodes)
        ):
            floating.add(node)
            if node.op == "call_module":
                out.append({"name": str(node.target), "type": type(modules[node.target]).__name__})
            else:
                out.append({"name": node.name, "type": getattr(node.target, "__name__", str(node.target))})
    return out
