"""The CPU runtimes pqd deploys to, as plain callables: ONNX Runtime and OpenVINO.

This module imports neither torch nor the rest of pqd's heavy modules, so that a
benchmark worker (:mod:`pqd.measure.worker`) can time an ONNX file in a process that holds only
the runtime, as a deployment would. Inputs are anything ``numpy.asarray`` takes (a CPU
torch tensor included); outputs are numpy arrays.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from pqd.errors import PqdError

OPENVINO_PRECISION = "f32"  # OpenVINO's CPU plugin picks bf16 on AVX-512-BF16/AMX CPUs unless told; slower here

_EXTRAS = {"onnx": "onnx", "onnxscript": "onnx", "onnxruntime": "onnx", "openvino": "openvino"}


def require(module: str) -> ModuleType:
    """Import an optional dependency or raise a :class:`PqdError` naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extra = _EXTRAS.get(module, module)
        raise PqdError(f"{module} is not installed ({exc}); install it with: pip install 'pqd[{extra}]'") from None


def available(module: str) -> bool:
    try:
        require(module)
    except PqdError:
        return False
    return True


class OrtRunner:
    """An ONNX Runtime CPU session as a callable on a numpy array (or CPU torch tensor).

    ONNX Runtime's defaults but the thread count; thread spinning stays on (its default,
    what a deployment gets): pqd times each runtime in a worker process of its own, so a
    spinning pool cannot steal cores from another runtime. ``spinning=False`` turns it off
    for processes that share cores with other work.
    """

    runtime = "onnxruntime"

    def __init__(self, path: str | Path, *, threads: int, spinning: bool = True):
        ort = require("onnxruntime")
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "1" if spinning else "0")
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.settings = {
            "runtime": "onnxruntime",
            "version": ort.__version__,
            "file": Path(path).name,
            "providers": self.session.get_providers(),
            "intra_op_num_threads": threads,
            "inter_op_num_threads": 1,
            "allow_spinning": spinning,
            "graph_optimization_level": "ORT_ENABLE_ALL",
        }

    def __call__(self, x) -> np.ndarray:
        arr = np.asarray(x)
        return self.session.run(None, {self.input: arr})[0]


class OpenVinoRunner:
    """An OpenVINO CPU compiled model as a callable; one static-shape compilation per batch size.

    The inference precision hint is set explicitly (f32 by default): left alone, the CPU
    plugin runs FP32 layers in bf16 on CPUs with AVX-512-BF16/AMX, which changes results
    and was slower on this project's machine. The hint read back from the compiled model is
    recorded in ``settings``; ``int8_layers`` counts layers the plugin runs in u8/i8.
    """

    runtime = "openvino"

    def __init__(
        self,
        path: str | Path,
        *,
        threads: int,
        batch_sizes: Iterable[int] = (),
        precision: str = OPENVINO_PRECISION,
        dynamic_batch: bool = False,
    ):
        ov = require("openvino")
        self._ov, self.path, self.core = ov, str(path), ov.Core()
        self.dynamic_batch, self._compiled = dynamic_batch, None
        self.config = {
            "INFERENCE_NUM_THREADS": threads,
            "INFERENCE_PRECISION_HINT": precision,
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
            "ENABLE_CPU_PINNING": False,
        }
        self._requests: dict[tuple, Any] = {}
        self.settings = {
            "runtime": "openvino",
            "version": ov.get_version(),
            "file": Path(path).name,
            "device": "CPU",
            "config": {k: str(v) for k, v in self.config.items()},
            "batch_shape": "dynamic" if dynamic_batch else "static",
        }
        for bs in batch_sizes:
            self._request((bs,))

    def _request(self, key: tuple):
        req = self._requests.get(key)
        if req is None:
            compiled = self._compiled
            if compiled is None:
                model = self.core.read_model(self.path)
                shape = list(model.inputs[0].get_partial_shape())
                # static: one compilation per batch size (what a deployment with a fixed batch does); dynamic:
                # one compilation for every batch, the fallback for models whose static compile crashes
                model.reshape(
                    {model.inputs[0]: [-1 if self.dynamic_batch else key[0], *[d.get_length() for d in shape[1:]]]}
                )
                compiled = self.core.compile_model(model, "CPU", self.config)
                if self.dynamic_batch:
                    self._compiled = compiled
            req = self._requests[key] = compiled.create_infer_request()
            if "inference_precision_hint" not in self.settings:
                hint = compiled.get_property("INFERENCE_PRECISION_HINT")
                self.settings["inference_precision_hint"] = (
                    hint.to_string() if hasattr(hint, "to_string") else str(hint)
                )
                self.settings["int8_layers"] = _ov_int8_layers(compiled)
        return req

    def __call__(self, x) -> np.ndarray:
        arr = np.asarray(x)
        req = self._request((arr.shape[0],))
        req.infer([arr])
        return req.get_output_tensor(0).data


def _ov_int8_layers(compiled) -> int | None:
    """Compute layers (not constants, inputs, reorders) the CPU plugin runs in u8/i8."""
    try:
        n = 0
        for op in compiled.get_runtime_model().get_ordered_ops():
            rt = op.get_rt_info()
            keys = set(rt.keys())
            kind = rt["layerType"].astype(str) if "layerType" in keys else ""
            prec = rt["runtimePrecision"].astype(str) if "runtimePrecision" in keys else ""
            n += kind not in ("Const", "Input", "Output", "Parameter", "Result", "Reorder") and prec.lower() in (
                "u8",
                "i8",
            )
        return n
    except Exception:  # runtime-model rt_info is not a stable API
        return None
