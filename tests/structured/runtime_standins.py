"""Stand-ins for a runtime's load-and-run probe, run by the S stage's runtime check in a child
process (``pqd.structured.latency_model.RUNTIME_PROBE``): OpenVINO 2026.4's failures on some
INT8 models, reproduced without the models that trigger them."""

import os
import signal


def probe_segv_static(*, spec):
    """Crashes natively compiling at a static batch, runs with a dynamic one (DenseNet-style models)."""
    if not spec.get("dynamic_batch"):
        os.kill(os.getpid(), signal.SIGSEGV)
    return {"ok": True}


def probe_segv_always(*, spec):
    os.kill(os.getpid(), signal.SIGSEGV)


def probe_refuses(*, spec):
    """The error OpenVINO raises for a depthwise + layer-scale multiply INT8 model."""
    raise RuntimeError(
        "Exception from src/inference/src/cpp/core.cpp:112:\n"
        "\x1b[31mException from src/plugins/intel_cpu/src/plugin.cpp:552:\n"
        "[MultiplyPartialTransformation] Shape index '0' out of range\x1b[0m\n" + "dump line\n" * 100
    )
