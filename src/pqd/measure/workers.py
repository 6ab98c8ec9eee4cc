"""Benchmark workers seen from the coordinator: one lean process per variant.

:class:`Worker` starts ``python -P -m pqd.measure.worker SPEC`` (:func:`pqd.safety.isolate.python_command`:
the current folder is not on its ``sys.path``) and speaks its line protocol; it is a block
timer for :func:`pqd.measure.latency.interleave`. Use :func:`start_workers` as a context
manager so every worker is stopped, whatever happens.

The worker environment. A runtime's speed depends on environment variables read when its
thread pool starts: ``OMP_WAIT_POLICY=PASSIVE`` (advised for training processes that share
cores) makes PyTorch's OpenMP threads sleep between calls instead of waiting for the next one,
which a serving loop does not do (docs/BENCHMARKS.md, "The worker environment"). So every worker starts in the environment a serving process would have, the
same whatever the caller's shell holds (:func:`worker_environment`, the one definition): every
variable named by :data:`THREAD_ENV_PREFIXES` is removed and ``OMP_NUM_THREADS`` /
``MKL_NUM_THREADS`` are set to the thread count timed; each runtime's own thread setting
(``torch.set_num_threads``, ONNX Runtime's ``intra_op_num_threads``, OpenVINO's
``INFERENCE_NUM_THREADS``) is set by the worker. ``inherit_env=True`` (``measure.inherit_env``,
``pqd bench --inherit-env``) passes the caller's environment on unchanged instead. Either way
the worker reports the variables it saw, and :attr:`Worker.environment` records them with
the policy (``inherited``) and, when controlled, the caller's variables it ignored.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from pqd.errors import PqdError
from pqd.safety.isolate import child_environ, python_command, signal_name

log = logging.getLogger("pqd.measure")

#: Variables that change how a runtime's threads or kernels run on the CPU: OpenMP (GNU and Intel,
#: as in PyTorch), MKL, oneDNN, OpenBLAS/BLIS, numexpr, PyTorch's kernel selection. A name matches
#: when it starts with one of these.
THREAD_ENV_PREFIXES = (
    "OMP_",
    "GOMP_",
    "KMP_",
    "MKL_",
    "MKLDNN_",
    "DNNL_",
    "ONEDNN_",
    "OPENBLAS_",
    "GOTO_NUM_THREADS",
    "BLIS_",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_",
    "ATEN_CPU_CAPABILITY",
)
#: Shown in every record, ``None`` when unset (the runtime's default).
THREAD_ENV_SHOWN = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OMP_WAIT_POLICY",
    "OMP_PROC_BIND",
    "OMP_PLACES",
    "GOMP_SPINCOUNT",
    "KMP_BLOCKTIME",
    "KMP_AFFINITY",
)


class WorkerError(PqdError):
    """A benchmark worker failed to load its variant or died while timing it (``signal``: the
    signal that killed it, e.g. 'SIGSEGV', or None)."""

    signal: str | None = None


RUNTIME_NAMES = {"openvino": "OpenVINO", "onnxruntime": "ONNX Runtime"}


def runtime_name(kind: str) -> str:
    """The runtime a worker ``kind`` runs, for messages ('OpenVINO', 'ONNX Runtime', 'PyTorch')."""
    return RUNTIME_NAMES.get(kind, "PyTorch")


def thread_variables(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables of ``environ`` that :data:`THREAD_ENV_PREFIXES` names, sorted by name."""
    return {k: environ[k] for k in sorted(environ) if k.startswith(THREAD_ENV_PREFIXES)}


@dataclass(frozen=True)
class WorkerEnvironment:
    """What a worker timing ``threads`` threads starts with: ``env`` (its whole environment, less
    the import path :func:`pqd.safety.isolate.child_environ` adds), whether it is the caller's own
    (``inherited``), and the caller's threading variables it does not pass on (``ignored``)."""

    threads: int
    inherited: bool
    env: dict[str, str]
    ignored: dict[str, str]

    def record(self, seen: Mapping[str, str] | None = None) -> dict:
        """The JSON record: ``inherited``, ``variables`` (``seen``, the worker's own report, else
        ``env``'s; every :data:`THREAD_ENV_SHOWN` name present, None = unset), ``ignored_from_caller``."""
        variables = dict.fromkeys(THREAD_ENV_SHOWN) | thread_variables(self.env if seen is None else seen)
        return {
            "inherited": self.inherited,
            "variables": variables,
            "ignored_from_caller": dict(self.ignored),
            "policy": "the caller's environment, unchanged (inherit_env)"
            if self.inherited
            else "controlled: threading variables of the caller removed; OMP_NUM_THREADS and MKL_NUM_THREADS "
            "= the threads timed; each runtime's own thread count set",
        }


def worker_environment(
    threads: int, *, inherit_env: bool = False, environ: Mapping[str, str] | None = None
) -> WorkerEnvironment:
    """The environment every latency worker starts with (see the module docstring): ``environ``
    (default: this process's) less every threading variable, plus ``OMP_NUM_THREADS`` and
    ``MKL_NUM_THREADS`` = ``threads``; with ``inherit_env``, ``environ`` unchanged."""
    parent = dict(os.environ if environ is None else environ)
    if inherit_env:
        return WorkerEnvironment(threads, True, parent, {})
    caller = thread_variables(parent)
    env = {k: v for k, v in parent.items() if k not in caller}
    env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return WorkerEnvironment(threads, False, env, {k: v for k, v in caller.items() if env.get(k) != v})


def this_process_environment() -> dict:
    """The record of timing in this process (the in-process fallback): its own variables, inherited."""
    return WorkerEnvironment(0, True, dict(os.environ), {}).record() | {
        "policy": "this process's own environment (timed in-process, not in a worker)"
    }


class Worker:
    """One variant in a worker process started in :func:`worker_environment` (``inherit_env``: the caller's)."""

    def __init__(self, name: str, spec: dict, *, timeout: float = 600.0, inherit_env: bool = False):
        self.name, self.spec, self.timeout = name, spec, timeout
        self.started_env = worker_environment(int(spec["threads"]), inherit_env=inherit_env)
        request = spec | {"report_env": list(THREAD_ENV_PREFIXES)}
        self.proc = subprocess.Popen(
            python_command("pqd.measure.worker", json.dumps(request)),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
            env=child_environ(env=self.started_env.env, parent_path=True),
        )
        assert (
            self.proc.stdin is not None and self.proc.stdout is not None and self.proc.stderr is not None
        )  # PIPE above
        self.stdin, self.stdout, self.stderr = self.proc.stdin, self.proc.stdout, self.proc.stderr
        self.info: dict = {}

    @property
    def environment(self) -> dict:
        """The record of the environment this worker times in (:meth:`WorkerEnvironment.record`), as it reported it."""
        return self.started_env.record(self.info.get("thread_env"))

    def wait_ready(self) -> dict:
        self.info = self._read()
        return self.info

    def _read(self) -> dict:
        line = self.stdout.readline()
        if not line:
            self.proc.wait(timeout=self.timeout)
            tail = [t for t in (self.stderr.read() or "").strip().splitlines() if t.strip()][-5:]
            rc, rt = self.proc.returncode, runtime_name(self.spec.get("kind", ""))
            sig = signal_name(rc)
            what = f"bench worker for {self.name!r} (runtime {rt}{', file ' + Path(self.spec['path']).name if self.spec.get('path') else ''})"
            if sig:
                msg = (
                    f"{what} crashed with {sig} (exit status {rc}) {'while loading' if not self.info else 'while timing'}: "
                    f"a native crash in {rt}, not in pqd. Measure on another runtime (structured.runtime: onnxruntime "
                    "or pytorch; pqd bench --runtimes), or report the model to the runtime's developers"
                )
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
def start_workers(specs: Mapping[str, dict], *, inherit_env: bool = False) -> Iterator[dict[str, Worker]]:
    """Start one worker per spec (loading in parallel), wait until all are ready, stop all on exit.
    ``inherit_env``: time in the caller's environment instead of :func:`worker_environment`'s."""
    workers: dict[str, Worker] = {}
    try:
        for name, spec in specs.items():
            workers[name] = Worker(name, spec, inherit_env=inherit_env)
        for name, w in list(workers.items()):
            try:
                w.wait_ready()
            except WorkerError as exc:
                if not (exc.signal and w.spec.get("kind") == "openvino" and not w.spec.get("dynamic_batch")):
                    raise
                # OpenVINO crashes compiling some INT8 models at a static batch that it compiles with a
                # dynamic one: the crash killed only that worker, so load the model again with a dynamic batch
                log.warning(
                    "OpenVINO crashed (%s) compiling %r at a static batch; timing it with a dynamic batch instead",
                    exc.signal,
                    name,
                )
                w.close()
                workers[name] = Worker(name, dict(w.spec, dynamic_batch=True), inherit_env=inherit_env)
                workers[name].wait_ready()
        yield workers
    finally:
        for w in workers.values():
            w.close()


def workers_environment(workers: Mapping[str, Worker]) -> dict:
    """The environment record of a set of workers started together (the same for each by
    construction; a per-worker mapping under ``by_worker`` if they ever differ)."""
    records = {name: w.environment for name, w in workers.items()}
    first = next(iter(records.values()))
    return first if all(r == first for r in records.values()) else {"by_worker": records}
