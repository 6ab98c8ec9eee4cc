"""Run ``pqd.cli.main`` with a SIGKILL armed at one numbered event (helper of test_interrupt.py).

    python killpoint.py EVENTS_LOG KILL_AT -- run CONFIG --out DIR

Events, numbered in the order they happen in a run (identical for every fresh run of one config):

    enter          a phase starts: teacher, prune, quantize, distill, finalize ('setup' before them)
    step           an optimizer step has just been taken (so a kill lands mid-epoch)
    write-start    a checkpoint / file write is about to begin
    write-half     the temporary file holds half of its bytes (a kill in the middle of a write)
    before-rename  the temporary file is complete, the rename over the real name has not happened
    after-rename   the file is in place (the code after it, e.g. deleting the epoch file, has not run)

Each event is appended to EVENTS_LOG as a JSON line; at event number KILL_AT the process SIGKILLs
itself (KILL_AT = -1: never, the run just records its events).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
from pathlib import Path

log_path, kill_at = sys.argv[1], int(sys.argv[2])
argv = sys.argv[sys.argv.index("--") + 1 :]
out_dir = Path(argv[argv.index("--out") + 1]).resolve()
state = {"count": 0, "phase": "setup"}
Path(log_path).write_text("")  # each event appends one line and closes the file: nothing is lost at the kill


def _name(path) -> str:
    p = Path(path).resolve()
    return str(p.relative_to(out_dir)) if p.is_relative_to(out_dir) else p.name


def event(kind: str, detail: str = "") -> bool:
    """Record an event; True when it is the one to die at."""
    i = state["count"]
    state["count"] += 1
    with open(log_path, "a") as log:
        log.write(json.dumps({"i": i, "phase": state["phase"], "kind": kind, "detail": detail}) + "\n")
    return i == kill_at


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


import torch  # noqa: E402

import pqd.run.pipeline as pl  # noqa: E402
import pqd.run.rundir as rd  # noqa: E402
import pqd.train.checkpoint as ck  # noqa: E402


def _phase(name, fn):
    def run(*args, **kwargs):
        state["phase"] = name
        if event("enter", name):
            die()
        return fn(*args, **kwargs)

    return run


pl.train = _phase("teacher", pl.train)  # the pipeline's own `train` trains only the teacher
for _name_ in ("prune", "quantize", "distill"):  # the functions the registry's stage adapters call
    _mod_ = sys.modules[f"pqd.stages.{_name_}"]
    setattr(_mod_, _name_, _phase(_name_, getattr(_mod_, _name_)))
pl.finalize = _phase("finalize", pl.finalize)

_step = torch.optim.SGD.step


def step(self, *args, **kwargs):
    result = _step(self, *args, **kwargs)
    if event("step"):
        die()
    return result


torch.optim.SGD.step = step

_save_file = ck.save_file


def save_file(tensors, filename, metadata=None):  # inside save_checkpoint: filename is the temporary file
    real = _name(Path(filename).parent / Path(filename).name[1:].rsplit(".", 2)[0])  # '.NAME.XXXX.tmp' -> NAME
    if event("write-start", real):
        die()
    _save_file(tensors, filename, metadata=metadata)
    if event("write-half", real):
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)
        die()


ck.save_file = save_file

_atomic = ck.atomic_write_bytes


def atomic_write_bytes(path, data: bytes) -> None:
    if event("write-start", _name(path)):
        die()
    if event("write-half", _name(path)):
        fd, _ = tempfile.mkstemp(prefix=f".{Path(path).name}.", suffix=".tmp", dir=Path(path).parent)
        os.write(fd, data[: len(data) // 2])
        die()
    _atomic(path, data)


ck.atomic_write_bytes = pl.atomic_write_bytes = rd.atomic_write_bytes = atomic_write_bytes

_replace = os.replace


def replace(src, dst, *args, **kwargs):
    if event("before-rename", _name(dst)):
        die()
    _replace(src, dst, *args, **kwargs)
    if event("after-rename", _name(dst)):
        die()


os.replace = replace

from pqd.cli import main  # noqa: E402

code = main(argv)
sys.exit(code)
