"""Export a run's deployable model to ONNX and run it in ONNX Runtime and OpenVINO.

    pqd export RUN_DIR            # writes RUN_DIR/model_int8.onnx, teacher_fp32.onnx, export.json

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

Every export is checked against PyTorch on the run's test split: top-1 agreement of the
ONNX INT8 model with the TorchScript INT8 model (``model_int8.pt``), in each runtime, and
of the FP32 export with the FP32 teacher. The model input is the normalised image batch
``(x / 255 - mean) / std`` (float32 NCHW, dynamic batch); mean/std are in the metadata.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pqd.errors import ConfigError, ModelError
from pqd.fsguard import atomic_output, check_replaceable, safe_replace
from pqd.rundir import LoadedRun, RunDir
from pqd.runtimes import OPENVINO_PRECISION, OpenVinoRunner, OrtRunner, available, require  # noqa: F401 (re-exported)

log = logging.getLogger("pqd.export")

EXPORT_SCHEMA = 1
INT8_ONNX = RunDir.INT8_ONNX
TEACHER_ONNX = RunDir.TEACHER_ONNX
FINAL_FP32_ONNX = RunDir.FP32_ONNX
EXPORT_JSON = RunDir.EXPORT_JSON
INPUT_NAME, OUTPUT_NAME = "input", "logits"
# --------------------------------------------------------------------------- run loading


def load_run(run_dir: str | Path, *, allow_code: bool = False) -> LoadedRun:
    """Rebuild a finished run from ``run_dir``: :meth:`pqd.rundir.RunDir.load` (the one rebuild path).
    A config naming model code by import path is refused unless ``allow_code``."""
    return RunDir(run_dir).load(allow_code=allow_code)


# --------------------------------------------------------------------------- export


def reference_int8(student) -> nn.Module:
    """The student converted to FX's reference INT8 form with decomposed quantize/dequantize ops.

    Same conversion as :func:`pqd.stages.convert` (masks re-applied, BN folded, same qparams),
    but every quantized op is spelled as ``dequantize -> float op -> quantize``.
    """
    from pqd.stages.quantize import qconfig_mapping
    from pqd.train.loop import apply_masks

    if not student.quantized:
        raise ModelError("reference_int8 needs a quantized student (a run with a quantize stage)")
    qconfig_mapping()  # sets the x86 quantized engine and quiets FX's deprecation warnings
    from torch.ao.quantization import quantize_fx as qfx

    fn = getattr(qfx, "_convert_to_reference_decomposed_fx", None)
    if fn is None:
        raise ModelError(f"torch {torch.__version__} has no torch.ao.quantization.quantize_fx._convert_to_reference_decomposed_fx, "
                         "which the ONNX INT8 export needs")
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


def export_onnx(model: nn.Module, path: str | Path, input_shape: Sequence[int], *, metadata: dict[str, str] | None = None,
                fold: bool = True, overwrite: bool = False) -> dict:
    """Export ``model`` (FP32 or FX reference INT8) to ONNX with a dynamic batch dimension.

    An existing file at ``path`` is replaced only when pqd wrote it and nobody changed it
    since, or with ``overwrite`` (:func:`pqd.fsguard.atomic_output`).

    Returns a small record: file name, bytes on disk, opset, node counts by type and, for a
    QDQ model, the number of weights folded to int8 initializers.
    """
    onnx = require("onnx")
    require("onnxscript")  # torch.onnx's dynamo exporter translates through onnxscript
    path = Path(path)
    example = torch.randn(2, *input_shape)  # batch 2: a batch-1 example would be specialised to 1
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        with _quiet_exporter(), torch.no_grad():
            prog = torch.onnx.export(model.eval(), (example,), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                     dynamic_shapes=({0: batch},), optimize=True, verbose=False)
    except Exception as exc:  # the exporter raises many types
        detail = ANSI.sub("", str(exc))
        log.debug("ONNX export of %s failed; the exporter's full message:\n%s", type(model).__name__, detail)
        err = ModelError(f"ONNX export of {type(model).__name__} failed ({type(exc).__name__}): {first_useful_line(detail)}")
        err.detail = detail
        raise err from None
    assert prog is not None  # the dynamo exporter returns its program
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
    return {"file": path.name, "bytes": path.stat().st_size, "opset": opset, "ops": dict(sorted(ops.items())), "int8_weights": folded}


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


# --------------------------------------------------------------------------- runtimes


def run_logits(fn: Callable, ds, *, mean, std, batch_size: int = 256) -> torch.Tensor:
    """Logits of any callable (torch module, TorchScript, runner) on every image of ``ds``."""
    from pqd.data import batches

    out = []
    with torch.inference_mode():
        for x, _ in batches(ds, batch_size=batch_size, mean=mean, std=std):
            y = fn(x)
            out.append(torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y).float().clone())
    return torch.cat(out)


# --------------------------------------------------------------------------- a run's export


def _fingerprint(paths: Iterable[Path]) -> dict[str, list[int]]:
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in paths}


def _metadata(run: LoadedRun, form: str) -> dict[str, str]:
    d = run.data
    return {"pqd_form": form, "pqd_model": run.config.model.name, "pqd_stages": run.config.stage_string(),
            "input": "float32 NCHW (x/255 - mean)/std", "mean": json.dumps(list(d.mean)), "std": json.dumps(list(d.std)),
            "classes": json.dumps(list(d.test.classes))}


def _check(runner: Callable, reference: torch.Tensor, reference_name: str, run: LoadedRun) -> dict:
    return _check_on(runner, reference, reference_name, run.data)


def _check_on(runner: Callable, reference: torch.Tensor, reference_name: str, d) -> dict:
    logits = run_logits(runner, d.test, mean=d.mean, std=d.std)
    return {"reference": reference_name, "n": int(len(d.test)),
            "agreement": (logits.argmax(1) == reference.argmax(1)).float().mean().item(),
            "top1": (logits.argmax(1) == d.test.y).float().mean().item(),
            "reference_top1": (reference.argmax(1) == d.test.y).float().mean().item(),
            "max_abs_logit_diff": (logits - reference).abs().max().item()}


def check_runtime(*, run_dir: str, onnx: str, runtime: str, reference: str, reference_name: str, threads: int) -> dict:
    """Child side of an isolated runtime check (:func:`pqd.isolate.run_isolated`): load the run's
    test split and the reference logits, run one ONNX file in one runtime, compare."""
    from safetensors.torch import load_file

    from pqd.config import load_config
    from pqd.data import load_data

    config = load_config(Path(run_dir) / RunDir.CONFIG)
    data = load_data(config.data, seed=config.seed)
    ref = load_file(reference)["logits"]
    cls = {"onnxruntime": OrtRunner, "openvino": OpenVinoRunner}[runtime]
    return _check_on(cls(Path(onnx), threads=threads), ref, reference_name, data)


def export_run(run_dir: str | Path, *, force: bool = False, check: bool = True, openvino: bool | None = None,
               run: LoadedRun | None = None, runtimes: Sequence[str] | None = None, allow_code: bool = False) -> dict:
    """Export a finished run to ONNX (INT8 QDQ and the FP32 teacher) and check the exports.

    Writes ``RUN_DIR/model_int8.onnx`` (or ``model_fp32.onnx`` for a run without a quantize
    stage), ``RUN_DIR/teacher_fp32.onnx`` and ``RUN_DIR/export.json``; returns the record.
    Files already exported from the same run files are reused unless ``force``. ``check``
    runs every export on the test split in ONNX Runtime and (``openvino``: None = when
    installed) OpenVINO and records top-1 agreement with the PyTorch model it came from; each
    runtime's check runs in a process of its own, so a native crash becomes an entry of
    ``record["failed"]`` naming runtime and model while the others still report. ``runtimes``:
    a subset of ("onnxruntime", "openvino"). The run folder is locked while exporting; a config
    naming model code by import path is refused unless ``allow_code``.
    """
    require("onnx"), require("onnxscript"), require("onnxruntime")
    out = Path(run_dir)
    rd = RunDir(out)
    if runtimes is not None:
        bad = set(runtimes) - {"onnxruntime", "openvino"}
        if bad:
            raise ConfigError(f"--runtimes: {', '.join(sorted(bad))} not valid; choose from onnxruntime, openvino")
        if "openvino" not in runtimes:
            openvino = False
        elif openvino is None:
            openvino = True
    with rd.claim():
        return _export_run(rd, out, force=force, check=check, openvino=openvino, run=run, allow_code=allow_code,
                           ort="onnxruntime" in runtimes if runtimes is not None else True)


def _export_run(rd: RunDir, out: Path, *, force: bool, check: bool, openvino: bool | None, run: LoadedRun | None,
                allow_code: bool, ort: bool) -> dict:
    run = run or rd.load(allow_code=allow_code)
    student_file = run.student_file or run.deployed_file  # a dense run's final model is its FP32 file
    sources = [run.deployed_file, student_file, rd.teacher_path]
    final_name = INT8_ONNX if run.quantized else FINAL_FP32_ONNX
    record_path = out / EXPORT_JSON
    # before any work: never replace an export.json or ONNX file pqd did not write (the user's own)
    check_replaceable([record_path, out / final_name, out / TEACHER_ONNX], overwrite=force)
    old: dict = {}
    if record_path.is_file() and not force:
        with contextlib.suppress(ValueError):
            old = json.loads(record_path.read_text())
    fresh = (old.get("schema") == EXPORT_SCHEMA and old.get("sources") == _fingerprint(sources)
             and (out / final_name).is_file() and (out / TEACHER_ONNX).is_file())
    if fresh:
        record = old
    else:
        shape = run.input_shape
        final_model = reference_int8(run.student) if run.quantized else copy.deepcopy(run.student.model).eval()
        final_form = "int8_qdq" if run.quantized else "fp32"
        log.info("export: %s -> %s", student_file.name, final_name)
        final_rec = export_onnx(final_model, out / final_name, shape, metadata=_metadata(run, final_form) | _predict_meta(run, final_form),
                                fold=run.quantized, overwrite=force)
        final_rec.update(form=final_form, source=str(student_file.relative_to(out)))
        if run.quantized:
            zeros = int8_initializer_zeros(out / final_name)
            z, n = sum(v[0] for v in zeros.values()), sum(v[1] for v in zeros.values())
            final_rec["int8_weight_zero_fraction"] = z / n if n else None
        log.info("export: teacher -> %s", TEACHER_ONNX)
        teacher_rec = export_onnx(run.teacher, out / TEACHER_ONNX, shape, metadata=_metadata(run, "fp32") | _predict_meta(run, "fp32"),
                                  fold=False, overwrite=force)
        teacher_rec.update(form="fp32", source=rd.TEACHER)
        record = {
            "schema": EXPORT_SCHEMA,
            "route": ("prepared fake-quant student -> FX reference-decomposed INT8 graph -> torch.onnx.export(dynamo=True) "
                      "-> QDQ ONNX; weight QuantizeLinear folded into int8 initializers") if run.quantized
                     else "FP32 student -> torch.onnx.export(dynamo=True)",
            "input": {"name": INPUT_NAME, "shape": ["batch", *shape], "normalize": {"mean": list(run.data.mean), "std": list(run.data.std)}},
            "artefacts": {"final": final_rec, "teacher_fp32": teacher_rec},
            "sources": _fingerprint(sources),
            "torch": torch.__version__, "onnx": require("onnx").__version__,
            "checks": {}, "skipped": {},
        }
    if check:
        _run_checks(record, run, out, final_name, openvino, ort=ort)
    safe_replace(record_path, json.dumps(record, indent=2).encode(), overwrite=force)
    return record


def _predict_meta(run: LoadedRun, form: str) -> dict[str, str]:
    """The record ``pqd predict`` reads from an ONNX file (normalisation outside: the file takes
    normalised float input)."""
    from pqd.deployable import deployable_meta, onnx_metadata

    d = run.data
    return onnx_metadata(deployable_meta(mean=d.mean, std=d.std, class_names=d.test.classes, input_shape=d.image_shape,
                                         normalization="outside", extra={"form": form, "model": run.config.model.name},
                                         preprocess=d.preprocess))


SCRATCH_PREFIX, SCRATCH_SUFFIX = ".pqd-export-", ".tmp"  # hidden, and a name pqd's run-folder guard treats as its own


@contextlib.contextmanager
def scratch_dir(run_dir: Path) -> Iterator[str]:
    """A scratch folder inside the run folder (never in the system temp folder, where a killed
    export would leave it behind unnoticed), removed afterwards; a previous, killed export's
    scratch folders are removed first."""
    for old in Path(run_dir).glob(f"{SCRATCH_PREFIX}*{SCRATCH_SUFFIX}"):
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=SCRATCH_PREFIX, suffix=SCRATCH_SUFFIX, dir=run_dir) as tmp:
        yield tmp


def _run_checks(record: dict, run: LoadedRun, out: Path, final_name: str, openvino: bool | None, *, ort: bool = True) -> None:
    from safetensors.torch import save_file

    from pqd.errors import RuntimeCrash
    from pqd.isolate import run_isolated

    checks, skipped = record.setdefault("checks", {}), record.setdefault("skipped", {})
    failed = record.setdefault("failed", {})
    failed.clear()
    want_ov = available("openvino") if openvino is None else openvino
    if not want_ov and not any(k.startswith("openvino_") for k in checks):
        skipped["openvino"] = ("not requested" if openvino is False else "openvino is not installed: pip install 'pqd[openvino]'")
    d = run.data
    form = "int8" if run.quantized else "fp32_final"
    todo = ([("onnxruntime", OrtRunner)] if ort else []) + ([("openvino", OpenVinoRunner)] if want_ov else [])
    if all(f"{rt}_{k}" in checks for rt, _ in todo for k in (form, "fp32")):
        return
    ref_final = run_logits(run.deployed, d.test, mean=d.mean, std=d.std)
    ref_teacher = run_logits(run.teacher, d.test, mean=d.mean, std=d.std)
    final_ref_name = "pytorch_int8 (model_int8.pt)" if run.quantized else "pytorch_fp32 (final student)"
    threads = max(1, torch.get_num_threads())
    with scratch_dir(out) as tmp:
        refs = {form: str(Path(tmp) / "final.safetensors"), "fp32": str(Path(tmp) / "teacher.safetensors")}
        save_file({"logits": ref_final.contiguous()}, refs[form])
        save_file({"logits": ref_teacher.contiguous()}, refs["fp32"])
        for rt, _cls in todo:
            skipped.pop(rt, None)
            for k, onnx_file, ref_name in ((form, final_name, final_ref_name), ("fp32", TEACHER_ONNX, "pytorch_fp32_eager (teacher)")):
                if f"{rt}_{k}" in checks:
                    continue
                try:  # a process of its own: a native crash (segfault) is reported, the other checks go on
                    checks[f"{rt}_{k}"] = run_isolated(
                        "pqd.export:check_runtime", {"run_dir": str(out), "onnx": str(out / onnx_file), "runtime": rt,
                                                     "reference": refs[k], "reference_name": ref_name, "threads": threads},
                        timeout=900, runtime=rt, model=f"{run.config.model.name} ({onnx_file})")
                except RuntimeCrash as exc:
                    failed[f"{rt}_{k}"] = str(exc).split("\n--- ")[0]
                    log.error("%s", exc)
                    continue
                c = checks[f"{rt}_{k}"]
                log.info("export check: %s_%s agrees with %s on %.2f%% of %d test images", rt, k, c["reference"], 100 * c["agreement"], c["n"])
