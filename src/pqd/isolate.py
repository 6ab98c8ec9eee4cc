"""Run a function in a fresh Python process, so that a native crash (a runtime's segfault
or abort) or a hang becomes an error with a message instead of killing pqd.

``run_isolated("pqd.export:check_openvino", {"onnx": "...", "batch": 8}, timeout=300,
runtime="openvino", model="densenet")`` starts ``python -m pqd.isolate`` (a new process,
not a fork: no inherited threads, locks or CUDA state), passes the keyword arguments as
JSON on stdin, and reads the JSON return value back from a result file; nothing is
pickled either way. The outcome:

* the function returned: its value (JSON types: dict, list, str, int, float, bool, None);
* it raised a :class:`pqd.errors.PqdError`: the same class is raised here with its message;
* anything else: :class:`pqd.errors.RuntimeCrash` naming runtime and model, with the
  signal (``SIGSEGV``...) or exit status, or the timeout, or the Python exception, and the
  last lines of the child's stderr (``faulthandler`` prints the Python stack of a segfault
  there). Attributes: ``returncode``, ``signal`` (name or None), ``timed_out``, ``stderr``.

:func:`isolate_each` runs several such calls one after the other and reports every
outcome, so one runtime's crash does not hide the others' results.
"""

from __future__ import annotations

import faulthandler
import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pqd.errors as errors
from pqd.errors import PqdError, RuntimeCrash

__all__ = ["run_isolated", "isolate_each"]

_STDERR_LINES = 15


def _signal_name(rc: int) -> str | None:
    num = -rc if rc < 0 else rc - 128 if 128 < rc < 160 else None  # exit 139 via a shell = 128 + SIGSEGV
    if num is None:
        return None
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def _label(target: str, runtime: str | None, model: str | None) -> str:
    parts = [f"runtime {runtime}" if runtime else None, f"model {model!r}" if model else None]
    named = " / ".join(p for p in parts if p)
    return f"{named} ({target})" if named else target


def _tail(text: str, n: int = _STDERR_LINES) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return "\n".join(lines[-n:])


def _crash(message: str, *, returncode: int | None, sig: str | None, timed_out: bool, stderr: str) -> RuntimeCrash:
    tail = _tail(stderr)
    return RuntimeCrash(message + (f"\n--- last lines of its stderr ---\n{tail}" if tail else ""),
                        returncode=returncode, signal=sig, timed_out=timed_out, stderr=stderr)


def _child_env(extra_path: Sequence[str | os.PathLike], env: Mapping[str, str] | None) -> dict[str, str]:
    out = dict(os.environ if env is None else env)
    root = str(Path(__file__).resolve().parent.parent)  # the folder holding this pqd package
    paths = [os.fspath(p) for p in extra_path] + [root] + [p for p in out.get("PYTHONPATH", "").split(os.pathsep) if p]
    out["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    out.setdefault("PYTHONFAULTHANDLER", "1")
    return out


def run_isolated(
    target: str,
    args: Mapping[str, Any] | None = None,
    *,
    timeout: float,
    runtime: str | None = None,
    model: str | None = None,
    extra_path: Sequence[str | os.PathLike] = (),
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
) -> Any:
    """Call ``target`` ("package.module:function") with keyword ``args`` in a new process
    and return its JSON result (see the module doc for errors). ``timeout`` in seconds;
    the child's whole process group is killed when it passes. ``extra_path`` is prepended
    to the child's ``PYTHONPATH`` (this pqd's folder always is)."""
    module, sep, func = target.partition(":")
    if not sep or not module or not func:
        raise ValueError(f"target must be 'package.module:function', got {target!r}")
    try:
        payload = json.dumps(dict(args or {}))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"run_isolated: args for {target} must be JSON-serialisable: {exc}") from None
    label = _label(target, runtime, model)
    with tempfile.TemporaryDirectory(prefix="pqd-isolate-") as tmp:
        result = Path(tmp) / "result.json"
        proc = subprocess.Popen(
            # -P (3.11+): the current folder is not put on sys.path, so a stray pqd/ or a module named
            # like the target in the working folder is never imported in its place
            [sys.executable, *(["-P"] if sys.version_info >= (3, 11) else []), "-m", "pqd.isolate", target, str(result)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=_child_env(extra_path, env), cwd=cwd, start_new_session=True, text=True, errors="replace",
        )
        try:
            _, stderr = proc.communicate(payload, timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                proc.kill()
            _, stderr = proc.communicate()
            raise _crash(f"{label} did not finish within {timeout:g} s and was stopped; the other checks go on",
                         returncode=proc.returncode, sig=None, timed_out=True, stderr=stderr or "") from None
        rc = proc.returncode
        try:
            record = json.loads(result.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            record = None
    if record is None:
        sig = _signal_name(rc)
        how = f"crashed with {sig} (exit status {rc})" if sig else f"exited with status {rc} without a result"
        raise _crash(f"{label} {how}: a native crash in that runtime, not in pqd; the other checks go on",
                     returncode=rc, sig=sig, timed_out=False, stderr=stderr or "")
    if record.get("ok"):
        return record.get("value")
    cls = getattr(errors, record.get("pqd_class") or "", None)
    if isinstance(cls, type) and issubclass(cls, PqdError):
        raise cls(record.get("message", ""))
    raise _crash(f"{label} failed: {record.get('type')}: {record.get('message')}", returncode=rc, sig=None,
                 timed_out=False, stderr=(stderr or "") + "\n" + record.get("traceback", ""))


def isolate_each(
    jobs: Mapping[str, tuple[str, Mapping[str, Any]]],
    *,
    timeout: float,
    model: str | None = None,
    extra_path: Sequence[str | os.PathLike] = (),
) -> dict[str, dict[str, Any]]:
    """Run ``{name: (target, args)}`` one at a time, each isolated (``runtime`` = name).
    Returns ``{name: {"ok": True, "value": ...}}`` or ``{name: {"ok": False, "error": message,
    "kind": "crash"|"timeout"|"error"}}`` for every job, whatever happened to the others."""
    out: dict[str, dict[str, Any]] = {}
    for name, (target, args) in jobs.items():
        try:
            out[name] = {"ok": True, "value": run_isolated(target, args, timeout=timeout, runtime=name, model=model,
                                                           extra_path=extra_path)}
        except RuntimeCrash as exc:
            kind = "timeout" if exc.timed_out else "crash" if exc.signal else "error"
            out[name] = {"ok": False, "error": str(exc).split("\n--- ")[0], "kind": kind}
        except PqdError as exc:
            out[name] = {"ok": False, "error": str(exc), "kind": "error"}
    return out


# --------------------------------------------------------------------------- child side


def _write_result(path: Path, record: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record), encoding="utf-8")
    os.replace(tmp, path)


def _child(argv: list[str]) -> int:
    faulthandler.enable()
    target, result = argv[0], Path(argv[1])
    try:
        args = json.loads(sys.stdin.read() or "{}")
        module, _, func = target.partition(":")
        fn = getattr(importlib.import_module(module), func)
        value = fn(**args)
        text = json.dumps({"ok": True, "value": value})
    except BaseException as exc:  # report everything (SystemExit too) to the parent
        record = {"ok": False, "type": type(exc).__name__, "message": str(exc),
                  "pqd_class": next((c.__name__ for c in type(exc).__mro__ if c.__module__ == "pqd.errors"), None),
                  "traceback": "".join(traceback.format_exception(exc))[-4000:]}
        _write_result(result, record)
        return 1
    tmp = result.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, result)
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
