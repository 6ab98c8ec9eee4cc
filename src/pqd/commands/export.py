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
import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import torch

from pqd.deploy.onnx import INPUT_NAME, export_onnx, int8_initializer_zeros, reference_int8, run_logits
from pqd.deploy.runtimes import OpenVinoRunner, OrtRunner, available, require
from pqd.errors import ConfigError
from pqd.run.loader import LoadedRun, load_run
from pqd.run.rundir import RunDir
from pqd.safety.fsguard import check_replaceable, safe_replace

log = logging.getLogger("pqd.export")

EXPORT_SCHEMA = 1
INT8_ONNX = RunDir.INT8_ONNX
TEACHER_ONNX = RunDir.TEACHER_ONNX
FINAL_FP32_ONNX = RunDir.FP32_ONNX
EXPORT_JSON = RunDir.EXPORT_JSON
# --------------------------------------------------------------------------- a run's export


def _fingerprint(paths: Iterable[Path]) -> dict[str, list[int]]:
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in paths}


def _metadata(run: LoadedRun, form: str) -> dict[str, str]:
    d = run.data
    return {
        "pqd_form": form,
        "pqd_model": run.config.model.name,
        "pqd_stages": run.config.stage_string(),
        "input": "float32 NCHW (x/255 - mean)/std",
        "mean": json.dumps(list(d.mean)),
        "std": json.dumps(list(d.std)),
        "classes": json.dumps(list(d.test.classes)),
    }


def _check(runner: Callable, reference: torch.Tensor, reference_name: str, run: LoadedRun) -> dict:
    return _check_on(runner, reference, reference_name, run.data)


def _check_on(runner: Callable, reference: torch.Tensor, reference_name: str, d) -> dict:
    logits = run_logits(runner, d.test, mean=d.mean, std=d.std)
    return {
        "reference": reference_name,
        "n": int(len(d.test)),
        "agreement": (logits.argmax(1) == reference.argmax(1)).float().mean().item(),
        "top1": (logits.argmax(1) == d.test.y).float().mean().item(),
        "reference_top1": (reference.argmax(1) == d.test.y).float().mean().item(),
        "max_abs_logit_diff": (logits - reference).abs().max().item(),
    }


def check_runtime(*, run_dir: str, onnx: str, runtime: str, reference: str, reference_name: str, threads: int) -> dict:
    """Child side of an isolated runtime check (:func:`pqd.safety.isolate.run_isolated`): load the run's
    test split and the reference logits, run one ONNX file in one runtime, compare."""
    from safetensors.torch import load_file

    from pqd.data import load_data
    from pqd.run.config import load_config

    config = load_config(Path(run_dir) / RunDir.CONFIG)
    data = load_data(config.data, seed=config.seed)
    ref = load_file(reference)["logits"]
    cls = {"onnxruntime": OrtRunner, "openvino": OpenVinoRunner}[runtime]
    return _check_on(cls(Path(onnx), threads=threads), ref, reference_name, data)


def export_run(
    run_dir: str | Path,
    *,
    force: bool = False,
    check: bool = True,
    openvino: bool | None = None,
    run: LoadedRun | None = None,
    runtimes: Sequence[str] | None = None,
    allow_code: bool = False,
    teacher: bool = True,
) -> dict:
    """Export a finished run to ONNX (INT8 QDQ and the FP32 teacher) and check the exports.

    Writes ``RUN_DIR/model_int8.onnx`` (or ``model_fp32.onnx`` for a run without a quantize
    stage), ``RUN_DIR/teacher_fp32.onnx`` and ``RUN_DIR/export.json``; returns the record.
    Files already exported from the same run files are reused unless ``force``. ``check``
    runs every export on the test split in ONNX Runtime and (``openvino``: None = when
    installed) OpenVINO and records top-1 agreement with the PyTorch model it came from; each
    runtime's check runs in a process of its own, so a native crash becomes an entry of
    ``record["failed"]`` naming runtime and model while the others still report. ``runtimes``:
    a subset of ("onnxruntime", "openvino"). The run folder is locked while exporting; a config
    naming model code by import path is refused unless ``allow_code``. ``teacher=False`` leaves the
    teacher out (no ``teacher_fp32.onnx``, no check of it): for callers that share one teacher export
    across many runs, as ``pqd tune``'s candidates share the PTQ run's.
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
        return _export_run(
            rd,
            out,
            force=force,
            check=check,
            openvino=openvino,
            run=run,
            allow_code=allow_code,
            ort="onnxruntime" in runtimes if runtimes is not None else True,
            teacher=teacher,
        )


def _export_run(
    rd: RunDir,
    out: Path,
    *,
    force: bool,
    check: bool,
    openvino: bool | None,
    run: LoadedRun | None,
    allow_code: bool,
    ort: bool,
    teacher: bool,
) -> dict:
    run = run or load_run(rd.path, allow_code=allow_code)
    student_file = run.student_file or run.deployed_file  # a dense run's final model is its FP32 file
    sources = [run.deployed_file, student_file, rd.teacher_path]
    final_name = INT8_ONNX if run.quantized else FINAL_FP32_ONNX
    record_path = out / EXPORT_JSON
    # before any work: never replace an export.json or ONNX file pqd did not write (the user's own)
    check_replaceable([record_path, out / final_name, *([out / TEACHER_ONNX] if teacher else [])], overwrite=force)
    old: dict = {}
    if record_path.is_file() and not force:
        with contextlib.suppress(ValueError):
            old = json.loads(record_path.read_text())
    fresh = (
        old.get("schema") == EXPORT_SCHEMA
        and old.get("sources") == _fingerprint(sources)
        and (out / final_name).is_file()
        and (not teacher or ("teacher_fp32" in old.get("artefacts", {}) and (out / TEACHER_ONNX).is_file()))
    )
    if fresh:
        record = old
    else:
        shape = run.input_shape
        final_model = reference_int8(run.student) if run.quantized else copy.deepcopy(run.student.model).eval()
        final_form = "int8_qdq" if run.quantized else "fp32"
        log.info("export: %s -> %s", student_file.name, final_name)
        final_rec = export_onnx(
            final_model,
            out / final_name,
            shape,
            metadata=_metadata(run, final_form) | _predict_meta(run, final_form),
            fold=run.quantized,
            overwrite=force,
        )
        final_rec.update(form=final_form, source=str(student_file.relative_to(out)))
        if run.quantized:
            zeros = int8_initializer_zeros(out / final_name)
            z, n = sum(v[0] for v in zeros.values()), sum(v[1] for v in zeros.values())
            final_rec["int8_weight_zero_fraction"] = z / n if n else None
        artefacts = {"final": final_rec}
        if teacher:
            log.info("export: teacher -> %s", TEACHER_ONNX)
            teacher_rec = export_onnx(
                run.teacher,
                out / TEACHER_ONNX,
                shape,
                metadata=_metadata(run, "fp32") | _predict_meta(run, "fp32"),
                fold=False,
                overwrite=force,
            )
            artefacts["teacher_fp32"] = teacher_rec | {"form": "fp32", "source": rd.TEACHER}
        record = {
            "schema": EXPORT_SCHEMA,
            "route": (
                "prepared fake-quant student -> FX reference-decomposed INT8 graph -> torch.onnx.export(dynamo=True) "
                "-> QDQ ONNX; weight QuantizeLinear folded into int8 initializers"
            )
            if run.quantized
            else "FP32 student -> torch.onnx.export(dynamo=True)",
            "input": {
                "name": INPUT_NAME,
                "shape": ["batch", *shape],
                "normalize": {"mean": list(run.data.mean), "std": list(run.data.std)},
            },
            "artefacts": artefacts,
            "sources": _fingerprint(sources),
            "torch": torch.__version__,
            "onnx": require("onnx").__version__,
            "checks": {},
            "skipped": {},
        }
    if check:
        _run_checks(record, run, out, final_name, openvino, ort=ort)
    safe_replace(record_path, json.dumps(record, indent=2).encode(), overwrite=force)
    return record


def _predict_meta(run: LoadedRun, form: str) -> dict[str, str]:
    """The record ``pqd predict`` reads from an ONNX file (normalisation outside: the file takes
    normalised float input)."""
    from pqd.deploy.deployable import deployable_meta, onnx_metadata

    d = run.data
    return onnx_metadata(
        deployable_meta(
            mean=d.mean,
            std=d.std,
            class_names=d.test.classes,
            input_shape=d.image_shape,
            normalization="outside",
            extra={"form": form, "model": run.config.model.name},
            preprocess=d.preprocess,
        )
    )


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


def _run_checks(
    record: dict, run: LoadedRun, out: Path, final_name: str, openvino: bool | None, *, ort: bool = True
) -> None:
    from safetensors.torch import save_file

    from pqd.errors import RuntimeCrash
    from pqd.safety.isolate import run_isolated

    checks, skipped = record.setdefault("checks", {}), record.setdefault("skipped", {})
    failed = record.setdefault("failed", {})
    failed.clear()
    want_ov = available("openvino") if openvino is None else openvino
    if not want_ov and not any(k.startswith("openvino_") for k in checks):
        skipped["openvino"] = (
            "not requested" if openvino is False else "openvino is not installed: pip install 'pqd[openvino]'"
        )
    d = run.data
    form = "int8" if run.quantized else "fp32_final"
    todo = ([("onnxruntime", OrtRunner)] if ort else []) + ([("openvino", OpenVinoRunner)] if want_ov else [])
    final_ref_name = "pytorch_int8 (model_int8.pt)" if run.quantized else "pytorch_fp32 (final student)"
    exported = [(form, final_name, final_ref_name, run.deployed)]  # (kind, file, reference name, reference model)
    if "teacher_fp32" in record["artefacts"]:
        exported.append(("fp32", TEACHER_ONNX, "pytorch_fp32_eager (teacher)", run.teacher))
    if all(f"{rt}_{e[0]}" in checks for rt, _ in todo for e in exported):
        return
    threads = max(1, torch.get_num_threads())
    with scratch_dir(out) as tmp:
        refs = {k: str(Path(tmp) / f"{k}.safetensors") for k, *_ in exported}
        for k, _, _, model in exported:
            save_file({"logits": run_logits(model, d.test, mean=d.mean, std=d.std).contiguous()}, refs[k])
        for rt, _cls in todo:
            skipped.pop(rt, None)
            for k, onnx_file, ref_name, _ in exported:
                if f"{rt}_{k}" in checks:
                    continue
                try:  # a process of its own: a native crash (segfault) is reported, the other checks go on
                    checks[f"{rt}_{k}"] = run_isolated(
                        "pqd.commands.export:check_runtime",
                        {
                            "run_dir": str(out),
                            "onnx": str(out / onnx_file),
                            "runtime": rt,
                            "reference": refs[k],
                            "reference_name": ref_name,
                            "threads": threads,
                        },
                        timeout=900,
                        runtime=rt,
                        model=f"{run.config.model.name} ({onnx_file})",
                    )
                except RuntimeCrash as exc:
                    failed[f"{rt}_{k}"] = str(exc).split("\n--- ")[0]
                    log.error("%s", exc)
                    continue
                c = checks[f"{rt}_{k}"]
                log.info(
                    "export check: %s_%s agrees with %s on %.2f%% of %d test images",
                    rt,
                    k,
                    c["reference"],
                    100 * c["agreement"],
                    c["n"],
                )
