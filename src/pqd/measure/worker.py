"""A benchmark worker: one model variant in its own lean process, timed on command.

    python -P -m pqd.measure.worker SPEC_JSON     (started by :class:`pqd.measure.workers.Worker`)

``pqd bench`` times every variant in a worker of its own, so each runtime runs in a
process that holds only itself, as a deployment would: ONNX Runtime and OpenVINO workers
never import torch. The coordinator interleaves blocks of calls across the workers (one
worker busy at a time, the others blocked on a pipe), so machine drift still hits every
variant alike. Measured reason (docs/BENCHMARKS.md): in one shared process, once an ONNX
Runtime session had run, OpenVINO INT8 ran 5-10% slower for the rest of the process's
life, even timed back to back.

Protocol: one JSON object per line. The worker answers ``{"ready": ..., "settings": ...,
"thread_env": ...}`` after loading (``thread_env``: the variables of its environment whose
names start with one of the spec's ``report_env`` prefixes), then serves commands from stdin:

    {"op": "warmup", "batch": B, "n": N}                      -> {"ok": true}
    {"op": "block", "batch": B, "settle_ms": S, "timed": K}   -> {"times": [s, ...], "settle_calls": C}
    {"op": "rss"}                                             -> {"peak_rss_mb": ..., "rss_mb": ...}
    {"op": "quit"}

Replies go to the process's original stdout; anything a library prints goes to stderr.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
import time

import numpy as np

from pqd.safety.isolate import adopt_parent_path

TORCH_KINDS = ("eager", "eager_student", "torchscript")


def status_mb(key: str) -> float | None:
    """A ``/proc/self/status`` memory field in MiB (VmRSS, VmHWM); None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def time_block(call, x, *, settle_ms: float, timed: int) -> tuple[list[float], int]:
    """One block: ``settle_ms`` of untimed calls (at least one), then ``timed`` timed calls.

    Returns (seconds per timed call, number of settle calls). Shared by the worker and by
    :class:`pqd.measure.latency.InProcess`, so both time exactly the same way.
    """
    perf = time.perf_counter
    t_end, settle = perf() + settle_ms / 1e3, 0
    while settle == 0 or perf() < t_end:
        call(x)
        settle += 1
    ts = []
    for _ in range(timed):
        t0 = perf()
        call(x)
        ts.append(perf() - t0)
    return ts, settle


def build(spec: dict):
    """(call, to_input, settings, inference context) for the variant ``spec`` describes."""
    kind, threads = spec["kind"], spec["threads"]
    if kind in TORCH_KINDS:
        import torch

        torch.set_num_threads(threads)
        if "x86" in torch.backends.quantized.supported_engines:
            torch.backends.quantized.engine = "x86"
        if kind == "eager":
            from pqd.models.registry import create_model
            from pqd.train.checkpoint import load_checkpoint

            model = create_model(spec["model"], num_classes=spec["num_classes"], **spec["kwargs"])
            model.load_state_dict(load_checkpoint(spec["weights"])[0])
        elif kind == "eager_student":  # the caller names the loader ('module:function'), a layer above this one
            module, _, function = spec["loader"].partition(":")
            load = getattr(importlib.import_module(module), function)
            model = load(spec["run_dir"], allow_code=bool(spec.get("allow_code")))
        else:
            # a pqd deployable takes raw images; time its bare model (normalised input), as before
            model = torch.jit.load(spec["path"], map_location="cpu")
            model.eval()
            model = getattr(model, "forward_normalized", model)
        if isinstance(model, torch.nn.Module):
            model.eval()
        settings = {
            "runtime": "pytorch",
            "version": torch.__version__,
            "form": kind,
            "threads": torch.get_num_threads(),
            "quantized_engine": torch.backends.quantized.engine,
        }
        return model, torch.from_numpy, settings, torch.inference_mode()
    if kind == "onnxruntime":
        from pqd.deploy.runtimes import OrtRunner

        r = OrtRunner(spec["path"], threads=threads)
        return r, np.ascontiguousarray, r.settings, contextlib.nullcontext()
    if kind == "openvino":
        from pqd.deploy.runtimes import OpenVinoRunner

        ov = OpenVinoRunner(
            spec["path"],
            threads=threads,
            batch_sizes=spec["batch_sizes"],
            dynamic_batch=bool(spec.get("dynamic_batch")),
        )
        return ov, np.ascontiguousarray, ov.settings, contextlib.nullcontext()
    raise ValueError(
        f"unknown worker kind {kind!r}; expected one of {', '.join((*TORCH_KINDS, 'onnxruntime', 'openvino'))}"
    )


def probe(*, spec: dict) -> dict:
    """Build the variant and call it once at each batch size (run in a process of its own by
    ``pqd bench`` first, so a runtime that crashes is reported and left out)."""
    call, to_input, settings, ctx = build(spec)
    rng = np.random.default_rng(spec.get("seed", 0))
    with ctx:
        for bs in spec["batch_sizes"]:
            call(to_input(rng.standard_normal((bs, *spec["input_shape"]), dtype=np.float32)))
    return {"ok": True}


def serve(spec: dict, proto) -> None:
    def send(obj: dict) -> None:
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    after_import = status_mb("VmRSS")
    try:
        call, to_input, settings, ctx = build(spec)
    except Exception as exc:  # reported to the coordinator, which raises it there with the variant's name
        send({"error": f"{type(exc).__name__}: {exc}"})
        return
    rng = np.random.default_rng(spec.get("seed", 0))
    inputs = {
        bs: to_input(rng.standard_normal((bs, *spec["input_shape"]), dtype=np.float32)) for bs in spec["batch_sizes"]
    }
    prefixes = tuple(spec.get("report_env") or ())
    send(
        {
            "ready": True,
            "settings": settings,
            "pid": os.getpid(),
            "imports_torch": "torch" in sys.modules,
            "after_import_mb": after_import,
            "after_load_mb": status_mb("VmRSS"),
            "thread_env": {k: v for k, v in sorted(os.environ.items()) if prefixes and k.startswith(prefixes)},
        }
    )
    with ctx:
        for line in sys.stdin:
            cmd = json.loads(line)
            op = cmd["op"]
            if op == "quit":
                break
            if op == "rss":
                send({"peak_rss_mb": status_mb("VmHWM"), "rss_mb": status_mb("VmRSS")})
                continue
            x = inputs[cmd["batch"]]
            if op == "warmup":
                for _ in range(cmd["n"]):
                    call(x)
                send({"ok": True})
            elif op == "block":
                ts, settle = time_block(call, x, settle_ms=cmd["settle_ms"], timed=cmd["timed"])
                send({"times": ts, "settle_calls": settle})
            else:
                send({"error": f"unknown op {op!r}"})


def main() -> None:
    adopt_parent_path()  # a user model's folder, after the standard library and site-packages
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # library chatter on stdout must not corrupt the protocol
    serve(json.loads(sys.argv[1]), proto)


if __name__ == "__main__":
    main()
