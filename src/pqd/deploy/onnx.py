"""ONNX export of pqd models: the FP32 graph, or the INT8 student in QDQ form.

The INT8 model is exported in QDQ form: QuantizeLinear/DequantizeLinear pairs around
float operators, which ONNX Runtime and OpenVINO fuse into integer kernels.

Route, and why (torch 2.13): the converted model (``convert_fx``) cannot go through
``torch.export`` (its packed ``Conv2dPackedParamsBase`` weights are TorchScript classes),
and the TorchScript-based ``torch.onnx.export(dynamo=False)`` that still handles it is
deprecated. So the *same* prepared fake-quant student is converted a second way, to FX's
reference representation with decomposed quantize/dequantize ops
(``_convert_to_reference_decomposed_fx``: BN folded, same scales, zero points and int8
weights as ``convert_fx``), which ``torch.onnx.export(dynamo=True)`` translates op by op
into QuantizeLinear/DequantizeLinear. The exporter leaves each weight as an FP32 tensor
quantized at run time (QuantizeLinear -> Clip -> DequantizeLinear); :func:`fold_weights`
replaces that with an int8 initializer feeding DequantizeLinear, so the file holds int8
weights (a quarter of the bytes) and every pruned weight is an exact int8 zero in it.
Biases stay FP32 (both runtimes quantize them when fusing).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pqd.compress.qat import qconfig_mapping
from pqd.data import batches
from pqd.deploy.runtimes import require
from pqd.errors import ModelError
from pqd.safety.fsguard import atomic_output
from pqd.train.loop import apply_masks

log = logging.getLogger("pqd.export")

INPUT_NAME, OUTPUT_NAME = "input", "logits"


def reference_int8(student) -> nn.Module:
    """The student converted to FX's reference INT8 form with decomposed quantize/dequantize ops.

    Same conversion as :func:`pqd.stages.convert` (masks re-applied, BN folded, same qparams),
    but every quantized op is spelled as ``dequantize -> float op -> quantize``.
    """

    if not student.quantized:
        raise ModelError("reference_int8 needs a quantized student (a run with a quantize stage)")
    qconfig_mapping()  # sets the x86 quantized engine and quiets FX's deprecation warnings
    from torch.ao.quantization import quantize_fx as qfx

    fn = getattr(qfx, "_convert_to_reference_decomposed_fx", None)
    if fn is None:
        raise ModelError(
            f"torch {torch.__version__} has no torch.ao.quantization.quantize_fx._convert_to_reference_decomposed_fx, "
            "which the ONNX INT8 export needs"
        )
    model = copy.deepcopy(student.model).cpu().eval()
    apply_masks(model, student.masks)
    return fn(model)


@contextlib.contextmanager
def _quiet_exporter():
    """The dynamo exporter prints progress to stdout and warns about torchvision ops."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "onnx_ir")]
    old = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, old, strict=True):
            lg.setLevel(level)


def _constants(graph) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    out = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = numpy_helper.to_array(a.t)
    return out


def fold_weights(model) -> int:
    """Replace ``float weight -> QuantizeLinear [-> Clip] -> DequantizeLinear`` by an int8 initializer.

    The int8 values are computed the way PyTorch quantizes weights at conversion,
    ``round_half_even(w * float32(1 / scale)) + zero_point`` clamped to ``quant_min``/
    ``quant_max``, so they are bit-identical to the weights inside ``model_int8.pt`` (ONNX's
    QuantizeLinear divides instead, which differs by one step on about 2 in 10,000 weights).
    Returns the number of folded weights.
    """
    from onnx import helper, numpy_helper

    g = model.graph
    consts = _constants(g)
    inits = {i.name: i for i in g.initializer}
    consumers: dict[str, list] = {}
    for n in g.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    drop, new_inits, folded = set(), [], 0
    for q in list(g.node):
        if q.op_type != "QuantizeLinear" or q.input[0] not in inits or len(q.input) < 3:
            continue
        if q.input[1] not in consts or q.input[2] not in consts:
            continue
        w, scale, zp = consts[q.input[0]].astype(np.float32), consts[q.input[1]].astype(np.float32), consts[q.input[2]]
        axis = next((helper.get_attribute_value(a) for a in q.attribute if a.name == "axis"), 1)
        if scale.ndim == 1 and scale.size > 1:
            shape = [1] * w.ndim
            shape[axis] = -1
            scale, zpf = scale.reshape(shape), zp.astype(np.float32).reshape(shape)
        else:
            zpf = zp.astype(np.float32)
        info = np.iinfo(zp.dtype)
        qv = np.clip(np.rint(w * (np.float32(1.0) / scale)) + zpf, info.min, info.max)
        tail, out_name = q, q.output[0]
        nxt = consumers.get(out_name, [])
        if len(nxt) == 1 and nxt[0].op_type == "Clip" and all(x in consts for x in nxt[0].input[1:3]):
            clip = nxt[0]
            qv = np.clip(qv, consts[clip.input[1]], consts[clip.input[2]])
            tail, out_name = clip, clip.output[0]
        users = consumers.get(out_name, [])
        if not users or any(u.op_type != "DequantizeLinear" for u in users):
            continue
        new_name = f"{q.input[0]}_quantized"
        new_inits.append(numpy_helper.from_array(qv.astype(zp.dtype), new_name))
        for u in users:
            u.input[0] = new_name
        drop.update({id(q), id(tail)})
        if all(id(c) in drop for c in consumers.get(q.input[0], [])):
            g.initializer.remove(inits.pop(q.input[0]))
        folded += 1
    keep = [n for n in g.node if id(n) not in drop]
    del g.node[:]
    g.node.extend(keep)
    g.initializer.extend(new_inits)
    return folded


ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def first_useful_line(text: str, limit: int = 300) -> str:
    """The line of an exporter's error that says what failed: torch.export's long reports start with
    boilerplate ('Failed to export the model with torch.export. This is step 1/3 ...') and headings,
    and name the exception under '## Exception summary' as "<class '...'>: message"."""
    lines = [ln.strip() for ln in ANSI.sub("", text).splitlines() if ln.strip()]
    summary = [ln for ln in lines if ln.startswith("<class '")]
    plain = [ln for ln in lines if not ln.startswith(("#", "Failed to export the model with torch.export"))]
    line = (summary or plain or lines or ["no message"])[0]
    return line if len(line) <= limit else line[: limit - 3] + "..."


def export_onnx(
    model: nn.Module,
    path: str | Path,
    input_shape: Sequence[int],
    *,
    metadata: dict[str, str] | None = None,
    fold: bool = True,
    overwrite: bool = False,
) -> dict:
    """Export ``model`` (FP32 or FX reference INT8) to ONNX with a dynamic batch dimension.

    Returns a small record: file name, bytes on disk, opset, node counts by type and, for a
    QDQ model, the number of weights folded to int8 initializers.

    An existing file at ``path`` is replaced only when pqd wrote it and nobody changed it
    since, or with ``overwrite`` (:func:`pqd.safety.fsguard.atomic_output`).
    """
    onnx = require("onnx")
    require("onnxscript")  # torch.onnx's dynamo exporter translates through onnxscript
    path = Path(path)
    example = torch.randn(2, *input_shape)  # batch 2: a batch-1 example would be specialised to 1
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        with _quiet_exporter(), torch.no_grad():
            prog = torch.onnx.export(
                model.eval(),
                (example,),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: batch},),
                optimize=True,
                verbose=False,
            )
    except Exception as exc:  # the exporter raises many types
        detail = ANSI.sub("", str(exc))
        log.debug("ONNX export of %s failed; the exporter's full message:\n%s", type(model).__name__, detail)
        err = ModelError(
            f"ONNX export of {type(model).__name__} failed ({type(exc).__name__}): {first_useful_line(detail)}"
        )
        err.detail = detail
        raise err from None
    if prog is None:  # dynamo=True always returns a program; None is the legacy exporter's return
        raise ModelError(f"ONNX export of {type(model).__name__} returned no program")
    proto = prog.model_proto
    folded = fold_weights(proto) if fold else 0
    for n in proto.graph.node:  # the exporter's per-node provenance (stack traces...) doubles a small file
        del n.metadata_props[:]
        n.doc_string = ""
    for k, v in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.checker.check_model(proto)
    with atomic_output(path, overwrite=overwrite) as tmp:
        onnx.save(proto, str(tmp))
    ops: dict[str, int] = {}
    for n in proto.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    return {
        "file": path.name,
        "bytes": path.stat().st_size,
        "opset": opset,
        "ops": dict(sorted(ops.items())),
        "int8_weights": folded,
    }


def int8_initializer_zeros(path: str | Path) -> dict[str, tuple[int, int]]:
    """(exact zeros, size) of every int8 initializer of an ONNX file, by name."""
    onnx = require("onnx")
    from onnx import TensorProto, numpy_helper

    out = {}
    for init in onnx.load(str(path)).graph.initializer:
        if init.data_type == TensorProto.INT8:
            a = numpy_helper.to_array(init)
            out[init.name] = (int((a == 0).sum()), int(a.size))
    return out


def run_logits(fn: Callable, ds, *, mean, std, batch_size: int = 256) -> torch.Tensor:
    """Logits of any callable (torch module, TorchScript, runner) on every image of ``ds``."""
    out = []
    with torch.inference_mode():
        for x, _ in batches(ds, batch_size=batch_size, mean=mean, std=std):
            y = fn(x)
            out.append(torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y).float().clone())
    return torch.cat(out)
