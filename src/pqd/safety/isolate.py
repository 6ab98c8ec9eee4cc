"""Run a function in a fresh Python process, so that a native crash (a runtime's segfault
or abort) or a hang becomes an error with a message instead of killing pqd.

``run_isolated("pqd.commands.export:check_openvino", {"onnx": "...", "batch": 8}, timeout=300,
runtime="openvino", model="densenet")`` starts ``python -m pqd.safety.isolate`` (a new process,
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

Every Python process pqd starts (these, and the latency workers of :mod:`pqd.measure.workers`)
is started by :func:`python_command` with :func:`child_environ`: the current folder is never
on the child's ``sys.path`` (a ``json.py`` there must not replace the standard library's), pqd
itself comes first, the inherited ``PYTHONPATH`` keeps its place, and the folders this process
added to its own ``sys.path`` (a user model's package, say) are appended after the standard
library and site-packages by :func:`adopt_parent_path`, so they add modules without shadowing any.
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

__all__ = ["adopt_parent_path", "child_environ", "isolate_each", "python_command", "run_isolated", "signal_name"]

_STDERR_LINES = 15


def signal_name(rc: int) -> str | None:
    """'SIGSEGV' etc. for a process's exit status (negative: killed by that signal; 129-159 via a shell), else None."""
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
    return RuntimeCrash(
        message + (f"\n--- last lines of its stderr ---\n{tail}" if tail else ""),
        returncode=returncode,
        signal=sig,
        timed_out=timed_out,
        stderr=stderr,
    )


#: The child's copy of the folders this process added to ``sys.path``, appended there by :func:`adopt_parent_path`.
PARENT_PATH_VAR = "PQD_PARENT_SYS_PATH"

# Python 3.10 has no -P: run the module from -c after dropping the '' (current folder) entry -c puts first
_NO_CWD_RUNNER = (
    "import sys; del sys.path[0]; sys.argv = sys.argv[1:]; import runpy; "
    "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)"
)


def python_command(module: str, *args: str) -> list[str]:
    """``python -m module args...`` with the current folder kept off ``sys.path`` (``-P``)."""
    if sys.version_info >= (3, 11):
        return [sys.executable, "-P", "-m", module, *args]
    return [sys.executable, "-c", _NO_CWD_RUNNER, module, *args]


def _parent_additions() -> list[str]:
    """What this process has on ``sys.path`` beyond a fresh interpreter's defaults (its prefixes) and PYTHONPATH."""
    prefixes = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    inherited = {os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p}
    return [
        os.path.abspath(p)
        for p in sys.path
        if p
        and os.path.abspath(p) not in inherited
        and not any(os.path.realpath(p).startswith(pre) for pre in prefixes)
    ]


def child_environ(
    *, extra_path: Sequence[str | os.PathLike] = (), env: Mapping[str, str] | None = None, parent_path: bool = False
) -> dict[str, str]:
    """The environment of a Python child started with :func:`python_command`: ``env`` (default: this
    process's) with ``PYTHONPATH`` = ``extra_path``, this pqd's folder, the inherited entries; with
    ``parent_path``, this process's other ``sys.path`` folders too, for :func:`adopt_parent_path`."""
    out = dict(os.environ if env is None else env)
    root = str(Path(__file__).resolve().parent.parent)  # the folder holding this pqd package
    paths = [os.fspath(p) for p in extra_path] + [root] + [p for p in out.get("PYTHONPATH", "").split(os.pathsep) if p]
    out["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    given = {os.path.abspath(p) for p in paths}
    added = [p for p in dict.fromkeys(_parent_additions()) if p not in given] if parent_path else []
    out[PARENT_PATH_VAR] = os.pathsep.join(added)
    out.setdefault("PYTHONFAULTHANDLER", "1")
    return out


def adopt_parent_path() -> None:
    """In a child: append the parent's own ``sys.path`` folders (:func:`child_environ`) after everything else."""
    for p in os.environ.get(PARENT_PATH_VAR, "").split(os.pathsep):
        if p and p not in sys.path:
            sys.path.append(p)


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
    parent_path: bool = False,
) -> Any:
    """Call ``target`` ("package.module:function") with keyword ``args`` in a new process
    and return its JSON result (see the module doc for errors). ``timeout`` in seconds;
    the child's whole process group is killed when it passes. ``extra_path`` is prepended
    to the child's ``PYTHONPATH`` (this pqd's folder always is); ``parent_path`` appends this
    process's own ``sys.path`` folders to the child's (:func:`child_environ`)."""
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
            # the current folder is not on the child's sys.path, so a stray pqd/ or a module named
            # like the target (or like a standard module) in the working folder is never imported in its place
            python_command("pqd.safety.isolate", target, str(result)),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=child_environ(extra_path=extra_path, env=env, parent_path=parent_path),
            cwd=cwd,
            start_new_session=True,
            text=True,
            errors="replace",
        )
        try:
            _, stderr = proc.communicate(payload, timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                proc.kill()
            _, stderr = proc.communicate()
            raise _crash(
                f"{label} did not finish within {timeout:g} s and was stopped; the other checks go on",
                returncode=proc.returncode,
                sig=None,
                timed_out=True,
                stderr=stderr or "",
            ) from None
        rc = proc.returncode
        try:
            record = json.loads(result.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            record = None
    if record is None:
        sig = signal_name(rc)
        how = f"crashed with {sig} (exit status {rc})" if sig else f"exited with status {rc} without a result"
        raise _crash(
            f"{label} {how}: a native crash in that runtime, not in pqd; the other checks go on",
            returncode=rc,
            sig=sig,
            timed_out=False,
            stderr=stderr or "",
        )
    if record.get("ok"):
        return record.get("value")
    cls = getattr(errors, record.get("pqd_class") or "", None)
    if isinstance(cls, type) and issubclass(cls, PqdError):
        raise cls(record.get("message", ""))
    raise _crash(
        f"{label} failed: {record.get('type')}: {record.get('message')}",
        returncode=rc,
        sig=None,
        timed_out=False,
        stderr=(stderr or "") + "\n" + record.get("traceback", ""),
    )


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
            out[name] = {
                "ok": True,
                "value": run_isolated(target, args, timeout=timeout, runtime=name, model=model, extra_path=extra_path),
            }
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
    adopt_parent_path()
    target, result = argv[0], Path(argv[1])
    try:
        args = json.loads(sys.stdin.read() or "{}")
        module, _, func = target.partition(":")
        fn = getattr(importlib.import_module(module), func)
        value = fn(**args)
        text = json.dumps({"ok": True, "value": value})
    except BaseException as exc:  # report everything (SystemExit too) to the parent
        record = {
            "ok": False,
            "type": type(exc).__name__,
            "message": str(exc),
            "pqd_class": next((c.__name__ for c in type(exc).__mro__ if c.__module__ == "pqd.errors"), None),
            "traceback": "".join(traceback.format_exception(exc))[-4000:],
        }
        _write_result(result, record)
        return 1
    tmp = result.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, result)
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
