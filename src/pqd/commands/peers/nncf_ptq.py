"""NNCF post-training quantization of a dense FP32 teacher: the peer baseline of a study.

The question users ask: is the ordered pipeline worth it over a few seconds of
post-training quantization by a mainstream tool? :func:`nncf_ptq` answers the "PTQ" half
on pqd's own terms: the same teacher, the same test split, pqd's own evaluation and
statistics (:mod:`pqd.measure.stats`), and a deployable file that pqd's latency harness
(:mod:`pqd.measure.workers`, as ``pqd bench`` uses) times beside pqd's variants.

Route: teacher (``nn.Module``) -> FP32 ONNX (:func:`pqd.deploy.onnx.export_onnx`, the same
export ``pqd bench`` times as ``openvino_fp32``) -> ``nncf.quantize`` on

* ``backend='openvino'`` (default): the ONNX file read by OpenVINO; the result is saved as
  OpenVINO IR (``nncf_int8.xml`` + ``.bin``). NNCF's recommended CPU route; runs in OpenVINO.
* ``backend='onnx'``: the ONNX model itself; the result is a QDQ ONNX file
  (``nncf_int8.onnx``) that runs in ONNX Runtime and in OpenVINO.

Calibration: ``calibration_size`` images of the training split chosen with a seeded
generator, fed one image per item (NNCF's ``subset_size`` counts items), normalised exactly
like pqd's own inputs (``(x / 255 - mean) / std``, NCHW float32). Or any iterable of
normalised batches (a DataLoader yielding ``x`` or ``(x, y)``), split into single images.

NNCF is an optional extra: ``pip install 'pqd[peers]'`` (``nncf>=3.4`` plus what the route
needs: OpenVINO, onnx, onnxscript and ONNX Runtime). Without it :func:`nncf_ptq` raises a
:class:`pqd.errors.PqdError` naming the extra.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pqd.errors import ConfigError, PqdError

log = logging.getLogger("pqd.peers")

PEER_NAME = "nncf_ptq"
TEACHER_ONNX = "teacher_fp32.onnx"  # same name as a run's own FP32 export
ARTEFACTS = {"openvino": "nncf_int8.xml", "onnx": "nncf_int8.onnx"}
PREDICTIONS = "nncf_int8_predictions.npy"  # int16 [N]: argmax per test image, test-split order
RECORD = "nncf_ptq.json"
BACKENDS = tuple(ARTEFACTS)
RUNTIME = {
    "openvino": "openvino",
    "onnx": "onnxruntime",
}  # where each backend's file is evaluated (pqd.measure.worker kind)
PRESETS = ("performance", "mixed")


@dataclass(frozen=True)
class NncfPtqConfig:
    """How NNCF quantizes the teacher.

    ``calibration_size``: training images for calibration (NNCF's default is 300).
    ``backend``: 'openvino' (OpenVINO IR) or 'onnx' (QDQ ONNX). ``preset``: NNCF's
    'performance' (symmetric activations) or 'mixed' (asymmetric activations).
    ``fast_bias_correction``: NNCF's default bias correction (True) or its slower full
    variant. ``seed``: which calibration images. ``threads``: CPU threads for export,
    quantization and evaluation (None: leave as set).
    """

    calibration_size: int = 300
    backend: str = "openvino"
    preset: str = "performance"
    fast_bias_correction: bool = True
    seed: int = 0
    threads: int | None = None

    def __post_init__(self):
        if self.calibration_size < 1:
            raise ConfigError(f"nncf_ptq.calibration_size must be >= 1, got {self.calibration_size}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"nncf_ptq.backend {self.backend!r} is not valid; choose from {', '.join(BACKENDS)}")
        if self.preset not in PRESETS:
            raise ConfigError(f"nncf_ptq.preset {self.preset!r} is not valid; choose from {', '.join(PRESETS)}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"nncf_ptq.threads must be >= 1 or None, got {self.threads}")


def _require(module: str, extra: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise PqdError(
            f"the NNCF peer baseline needs {module}, which is not installed ({exc}); "
            f"install it with: pip install 'pqd[{extra}]'"
        ) from None


def require_nncf():
    """Import NNCF or raise a :class:`PqdError` naming the ``peers`` extra."""
    return _require("nncf", "peers")


@contextlib.contextmanager
def _quiet():
    """NNCF draws progress bars on stdout and logs at INFO; keep a caller's console clean."""
    nncf_log = logging.getLogger("nncf")
    old = nncf_log.level
    nncf_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        nncf_log.setLevel(old)


def calibration_images(data, *, size: int, seed: int = 0) -> list[np.ndarray]:
    """``size`` normalised training images (``[1, C, H, W]`` float32 each), chosen with ``seed``."""
    from pqd.data import batches

    n = len(data.train)
    idx = np.sort(np.random.default_rng(seed).permutation(n)[: min(size, n)])
    if size > n:
        log.warning("nncf_ptq: %d calibration images asked for, the training split has %d; using all", size, n)
    subset = data.train.subset(idx)
    out: list[np.ndarray] = []
    for x, _ in batches(subset, batch_size=256, mean=data.mean, std=data.std):
        out += [np.ascontiguousarray(x[i : i + 1].float().cpu().numpy()) for i in range(x.shape[0])]
    return out


def _from_iterable(items: Iterable, size: int) -> list[np.ndarray]:
    out: list[np.ndarray] = []
    for item in items:
        x = item[0] if isinstance(item, (tuple, list)) else item
        arr = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float32)
        if arr.ndim == 3:
            arr = arr[None]
        out += [np.ascontiguousarray(arr[i : i + 1]) for i in range(arr.shape[0])]
        if len(out) >= size:
            break
    if not out:
        raise ConfigError("nncf_ptq: the calibration iterable yielded no images")
    return out[:size]


def _export_teacher(teacher: nn.Module, path: Path, input_shape: Sequence[int]) -> None:
    from pqd.deploy.onnx import export_onnx

    export_onnx(
        teacher.cpu().eval(), path, input_shape, metadata={"pqd_form": "fp32", "pqd_peer_source": "teacher"}, fold=False
    )


def _quantize(onnx_path: Path, images: list[np.ndarray], out: Path, cfg: NncfPtqConfig) -> tuple[Path, dict]:
    nncf = require_nncf()
    preset = nncf.QuantizationPreset(cfg.preset)
    kwargs = dict(preset=preset, subset_size=len(images), fast_bias_correction=cfg.fast_bias_correction)
    if cfg.backend == "openvino":
        ov = _require("openvino", "peers")
        model = ov.Core().read_model(str(onnx_path))
        with _quiet():
            q = nncf.quantize(model, nncf.Dataset(images), **kwargs)
        dest = out / ARTEFACTS["openvino"]
        ov.save_model(q, str(dest))  # compresses FP32 constants to FP16 by default; INT8 weights stay INT8
        versions = {"openvino": ov.get_version()}
    else:
        onnx = _require("onnx", "peers")
        model = onnx.load(str(onnx_path))
        name = model.graph.input[0].name
        with _quiet():
            q = nncf.quantize(model, nncf.Dataset(images, lambda x: {name: x}), **kwargs)
        dest = out / ARTEFACTS["onnx"]
        onnx.save(q, str(dest))
        versions = {"onnx": onnx.__version__}
    return dest, versions


def _runner(path: Path, backend: str, threads: int):
    from pqd.deploy.runtimes import OpenVinoRunner, OrtRunner

    return OpenVinoRunner(path, threads=threads) if backend == "openvino" else OrtRunner(path, threads=threads)


def _bytes(path: Path) -> int:
    total = path.stat().st_size
    if path.suffix == ".xml" and path.with_suffix(".bin").is_file():
        total += path.with_suffix(".bin").stat().st_size
    return total


def nncf_ptq(
    teacher: nn.Module,
    data,
    out_dir: str | Path,
    *,
    config: NncfPtqConfig = NncfPtqConfig(),
    calibration: Iterable | None = None,
    teacher_onnx: str | Path | None = None,
    evaluate: bool = True,
    write: bool = True,
) -> dict:
    """Quantize ``teacher`` with NNCF PTQ, save the deployable file in ``out_dir``, evaluate it.

    ``data``: the run's :class:`pqd.data.Splits` (calibration images come from its training
    split, evaluation uses its test split and normalisation). ``calibration``: instead, an
    iterable of normalised batches (``x`` or ``(x, y)``). ``teacher_onnx``: an existing FP32
    ONNX export of ``teacher`` to quantize (a run's ``teacher_fp32.onnx``); otherwise the
    teacher is exported to ``out_dir/teacher_fp32.onnx`` (reused if present: delete it after
    changing the teacher). With ``evaluate``, both the teacher (PyTorch eager) and the NNCF
    model (in the runtime it targets) are evaluated on the whole test split: top-1 with a
    Wilson 95% interval, agreement, McNemar's test; the NNCF model's per-image predictions
    go to ``nncf_int8_predictions.npy`` for paired tests against other variants. With
    ``write``, the record also goes to ``out_dir/nncf_ptq.json``. Returns the record.
    """
    from pqd.measure.stats import correct_vector, mcnemar_paired, top1_record

    nncf = require_nncf()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    old_threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        timings: dict[str, float] = {}
        t = time.perf_counter()
        if teacher_onnx is None:
            onnx_path = out / TEACHER_ONNX
            if not onnx_path.is_file():
                _export_teacher(teacher, onnx_path, data.image_shape)
                timings["export_s"] = time.perf_counter() - t
        else:
            onnx_path = Path(teacher_onnx)
            if not onnx_path.is_file():
                raise PqdError(f"nncf_ptq: teacher ONNX file {str(onnx_path)!r} does not exist")
        t = time.perf_counter()
        images = (
            _from_iterable(calibration, config.calibration_size)
            if calibration is not None
            else calibration_images(data, size=config.calibration_size, seed=config.seed)
        )
        timings["calibration_data_s"] = time.perf_counter() - t
        t = time.perf_counter()
        try:
            dest, versions = _quantize(onnx_path, images, out, config)
        except PqdError:
            raise
        except Exception as exc:  # NNCF raises many types
            raise PqdError(
                f"nncf_ptq: nncf.quantize failed on {onnx_path.name} ({type(exc).__name__}): {str(exc)[:600]}"
            ) from None
        timings["quantize_s"] = time.perf_counter() - t
        record: dict[str, Any] = {
            "peer": PEER_NAME,
            "tool": {"nncf": nncf.__version__, **versions},
            "config": asdict(config),
            "route": f"teacher -> FP32 ONNX ({onnx_path.name}) -> nncf.quantize ({config.backend} backend, preset "
            f"{config.preset}, {len(images)} calibration images, one per item) -> {dest.name}",
            "backend": config.backend,
            "runtime": RUNTIME[config.backend],
            "precision": "int8",
            "calibration": {
                "images": len(images),
                "source": "iterable" if calibration is not None else f"train split, seed {config.seed}",
            },
            "teacher_onnx": str(onnx_path),
            "artefact": {"file": dest.name, "path": str(dest), "bytes": _bytes(dest)},
            "timings_s": {k: round(v, 3) for k, v in timings.items()},
        }
        if evaluate:
            from pqd.deploy.onnx import run_logits

            threads = config.threads or max(1, torch.get_num_threads())
            t = time.perf_counter()
            y = data.test.y.numpy()
            q_logits = run_logits(
                _runner(dest, config.backend, threads), data.test, mean=data.mean, std=data.std
            ).numpy()
            t_logits = run_logits(teacher.cpu().eval(), data.test, mean=data.mean, std=data.std).numpy()
            q_ok, t_ok = correct_vector(q_logits, y), correct_vector(t_logits, y)
            np.save(out / PREDICTIONS, q_logits.argmax(1).astype(np.int16))
            record["evaluation"] = {
                "split": "test",
                "n": int(len(y)),
                "top1": top1_record(q_ok),
                "teacher_top1": top1_record(t_ok),
                "agreement_with_teacher": float((q_logits.argmax(1) == t_logits.argmax(1)).mean()),
                "mcnemar_vs_teacher": mcnemar_paired(q_ok, t_ok),  # a = NNCF INT8, b = teacher FP32
                "predictions_file": PREDICTIONS,
                "evaluated_in": RUNTIME[config.backend],
            }
            record["timings_s"]["evaluate_s"] = round(time.perf_counter() - t, 3)
        if write:
            from pqd.train.checkpoint import atomic_write_bytes

            atomic_write_bytes(out / RECORD, json.dumps(record, indent=2).encode())
        return record
    finally:
        torch.set_num_threads(old_threads)


def peer_worker_spec(
    record: dict, *, input_shape: Sequence[int], batch_sizes: Sequence[int] = (1, 64), seed: int = 0
) -> dict:
    """A :mod:`pqd.measure.worker` spec (without ``threads``) that times the NNCF model, as ``pqd bench``'s variants do."""
    return {
        "kind": record["runtime"],
        "path": record["artefact"]["path"],
        "input_shape": list(input_shape),
        "batch_sizes": list(batch_sizes),
        "seed": seed,
    }


def time_peer(
    record: dict,
    *,
    input_shape: Sequence[int],
    threads: Sequence[int] = (1, 2),
    batch_sizes: Sequence[int] = (1, 64),
    warmup: int = 20,
    runs: int = 200,
    large_batch_runs: int = 20,
    seed: int = 0,
    inherit_env: bool = False,
) -> list[dict]:
    """Time the NNCF INT8 model against its FP32 teacher ONNX in the same runtime.

    Each in a worker process of its own, interleaved in blocks (:func:`pqd.measure.latency.interleave`),
    the way ``pqd bench`` times its variants; the first variant, ``<runtime>_fp32``, is the
    baseline of ``ratio_to_baseline``. Records gain ``runtime`` and ``precision`` (the shape
    :mod:`pqd.measure.speedup` reads) and ``latency_env``, the threading environment of their
    workers (controlled, or the caller's with ``inherit_env``: :func:`pqd.measure.workers.worker_environment`).
    """
    from pqd.measure.latency import interleave
    from pqd.measure.workers import start_workers, workers_environment

    rt = record["runtime"]
    base = {"input_shape": list(input_shape), "batch_sizes": list(batch_sizes), "seed": seed}
    specs = {
        f"{rt}_fp32": base | {"kind": rt, "path": record["teacher_onnx"]},
        f"{PEER_NAME}_int8": peer_worker_spec(record, input_shape=input_shape, batch_sizes=batch_sizes, seed=seed),
    }
    meta = {f"{rt}_fp32": ("fp32", "teacher"), f"{PEER_NAME}_int8": ("int8", PEER_NAME)}
    out: list[dict] = []
    for t in threads:
        with start_workers({k: v | {"threads": t} for k, v in specs.items()}, inherit_env=inherit_env) as workers:
            env = workers_environment(workers)
            recs = interleave(
                workers,
                batch_sizes=tuple(batch_sizes),
                threads=t,
                warmup=warmup,
                runs=runs,
                large_batch_runs=large_batch_runs,
            )
        for r in recs:
            r["runtime"], (r["precision"], r["source_model"]) = rt, meta[r["model"]]
            r["latency_env"] = env
        out += recs
    return out
