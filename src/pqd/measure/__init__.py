"""Measurement: accuracy, bytes on disk, wall-clock CPU latency, and the environment.

The names below load their submodule on first use: the timing worker (:mod:`pqd.measure.worker`)
runs inside this package and must not import torch to time an ONNX file."""

from importlib import import_module

_LAZY = {
    "agreement": "pqd.measure.accuracy",
    "predict": "pqd.measure.accuracy",
    "top1": "pqd.measure.accuracy",
    "environment": "pqd.measure.env",
    "faithfulness": "pqd.measure.faithfulness",
    "mcnemar": "pqd.measure.faithfulness",
    "Blocks": "pqd.measure.latency",
    "measure_latency": "pqd.measure.latency",
    "proxies": "pqd.measure.proxies",
    "file_bytes": "pqd.measure.size",
    "speedup_summary": "pqd.measure.speedup",
    "mcnemar_paired": "pqd.measure.stats",
    "top1_record": "pqd.measure.stats",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pqd.measure' has no attribute {name!r}")


__all__ = sorted(_LAZY)
