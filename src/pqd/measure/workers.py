"""Benchmark workers seen from the coordinator: one lean process per variant.

:class:`Worker` starts ``python -m pqd.measure.worker SPEC`` and speaks its line protocol; it is a
block timer for :func:`pqd.measure.latency.interleave`. Use :func:`start_workers` as a
context manager so every worker is stopped, whatever happens.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator, Mapping

from pqd.errors import PqdError
from pqd.safety.isolate import signal_name

log = logging.getLogger("pqd.measure")


class WorkerError(PqdError):
    """A benchmark worker failed to load its variant or died while timing it (``signal``: the
    signal that killed it, e.g. 'SIGSEGV', or None)."""

    signal: str | None = None


RUNTIME_NAMES = {"openvino": "OpenVINO", "onnxruntime": "ONNX Runtime"}


def runtime_name(kind: str) -> str:
    """The runtime a worker ``kind`` runs, for messages ('OpenVINO', 'ONNX Runtime', 'PyTorch')."""
    return RUNTIME_NAMES.get(kind, "PyTorch")


def _import_path(src_root: str) -> list[str]:
    """pqd's own root, then what this process added to ``sys.path`` (a user model's folder,
    say) beyond a fresh interpreter's defaults, then the inherited PYTHONPATH."""
    prefixes = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    extra = [p for p in sys.path if p and not any(os.path.realpath(p).startswith(pre) for pre in prefixes)]
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    out: list[str] = []
    for p in [src_root, *extra, *inherited]:
        if p not in out:
            out.append(p)
    return out


class Worker:
    def __init__(self, name: str, spec: dict, *, timeout: float = 600.0):
        self.name, self.spec, self.timeout = name, spec, timeout
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(_import_path(str(Path(__file__).resolve().parents[2])))
        self.proc = subprocess.Popen([sys.executable, "-m", "pqd.measure.worker", json.dumps(spec)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, bufsize=1)
        self.info: dict = {}

    def wait_ready(self) -> dict:
        self.info = self._read()
        return self.info

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=self.timeout)
            tail = [t for t in (self.proc.stderr.read() or "").strip().splitlines() if t.strip()][-5:]
            rc, rt = self.proc.returncode, runtime_name(self.spec.get("kind", ""))
            sig = signal_name(rc)
            what = f"bench worker for {self.name!r} (runtime {rt}{', file ' + Path(self.spec['path']).name if self.spec.get('path') else ''})"
            if sig:
                msg = (f"{what} crashed with {sig} (exit status {rc}) {'while loading' if not self.info else 'while timing'}: "
                       f"a native crash in {rt}, not in pqd. Measure on another runtime (structured.runtime: onnxruntime "
                       "or pytorch; pqd bench --runtimes), or report the model to the runtime's developers")
            else:
                msg = f"{what} exited with status {rc} without answering"
            err = WorkerError(msg + (f"; its last stderr lines: {' | '.join(tail)}" if tail else ""))
            err.signal = sig
            raise err
        msg = json.loads(line)
        if "error" in msg:
            raise WorkerError(f"bench worker for {self.name!r}: {msg['error']}")
        return msg

    def _ask(self, cmd: dict) -> dict:
        try:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # _read reports how the worker died
        return self._read()

    # the block-timer interface of pqd.measure.latency.interleave
    def warmup(self, batch: int, n: int) -> None:
        self._ask({"op": "warmup", "batch": batch, "n": n})

    def block(self, batch: int, *, settle_ms: float, timed: int) -> tuple[list[float], int]:
        r = self._ask({"op": "block", "batch": batch, "settle_ms": settle_ms, "timed": timed})
        return r["times"], r["settle_calls"]

    def rss(self) -> dict:
        return self._ask({"op": "rss"})

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(BrokenPipeError, OSError):
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            with contextlib.suppress(OSError):
                f.close()


@contextlib.contextmanager
def start_workers(specs: Mapping[str, dict]) -> Iterator[dict[str, Worker]]:
    """Start one worker per spec (loading in parallel), wait until all are ready, stop all on exit."""
    workers: dict[str, Worker] = {}
    try:
        for name, spec in specs.items():
            workers[name] = Worker(name, spec)
        for name, w in list(workers.items()):
            try:
                w.wait_ready()
            except WorkerError as exc:
                if not (exc.signal and w.spec.get("kind") == "openvino" and not w.spec.get("dynamic_batch")):
                    raise
                # OpenVINO crashes compiling some INT8 models at a static batch that it compiles with a
                # dynamic one: the crash killed only that worker, so load the model again with a dynamic batch
                log.warning("OpenVINO crashed (%s) compiling %r at a static batch; timing it with a dynamic batch instead",
                            exc.signal, name)
                w.close()
                workers[name] = Worker(name, dict(w.spec, dynamic_batch=True))
                workers[name].wait_ready()
        yield workers
    finally:
        for w in workers.values():
            w.close()
