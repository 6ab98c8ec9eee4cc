"""Benchmark workers seen from the coordinator: one lean process per variant.

:class:`Worker` starts ``python -m pqd._worker SPEC`` and speaks its line protocol; it is a
block timer for :func:`pqd.measure.latency.interleave`. Use :func:`start_workers` as a
context manager so every worker is stopped, whatever happens.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

from pqd.errors import PqdError


class WorkerError(PqdError):
    """A benchmark worker failed to load its variant or died while timing it."""


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
        import pqd

        self.name, self.spec, self.timeout = name, spec, timeout
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(_import_path(str(Path(pqd.__file__).resolve().parent.parent)))
        self.proc = subprocess.Popen([sys.executable, "-m", "pqd._worker", json.dumps(spec)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, bufsize=1)
        assert self.proc.stdin and self.proc.stdout and self.proc.stderr  # all three are pipes
        self.stdin, self.stdout, self.stderr = self.proc.stdin, self.proc.stdout, self.proc.stderr
        self.info: dict = {}

    def wait_ready(self) -> dict:
        self.info = self._read()
        return self.info

    def _read(self) -> dict:
        line = self.stdout.readline()
        if not line:
            self.proc.wait(timeout=self.timeout)
            tail = (self.stderr.read() or "").strip().splitlines()[-5:]
            raise WorkerError(f"bench worker for {self.name!r} exited (code {self.proc.returncode}): " + " | ".join(tail))
        msg = json.loads(line)
        if "error" in msg:
            raise WorkerError(f"bench worker for {self.name!r}: {msg['error']}")
        return msg

    def _ask(self, cmd: dict) -> dict:
        try:
            self.stdin.write(json.dumps(cmd) + "\n")
            self.stdin.flush()
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
                self.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.stdin.flush()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for f in (self.stdin, self.stdout, self.stderr):
            with contextlib.suppress(OSError):
                f.close()


@contextlib.contextmanager
def start_workers(specs: Mapping[str, dict]) -> Iterator[dict[str, Worker]]:
    """Start one worker per spec (loading in parallel), wait until all are ready, stop all on exit."""
    workers: dict[str, Worker] = {}
    try:
        for name, spec in specs.items():
            workers[name] = Worker(name, spec)
        for w in workers.values():
            w.wait_ready()
        yield workers
    finally:
        for w in workers.values():
            w.close()
