"""Functions run by tests/safety/test_isolate.py in child processes."""

import ctypes
import os
import signal
import sys
import time

from pqd.errors import ConfigError, StorageError


def add(a, b):
    print("noise on stdout is not the result")
    return {"sum": a + b, "pid": os.getpid()}


def segv():
    print("compiling model...", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGSEGV)


def null_deref():
    return ctypes.string_at(0)


def abort():
    os.abort()


def sleep(seconds):
    time.sleep(seconds)


def config_error():
    raise ConfigError("bad option x")


class MyStorage(StorageError):
    pass


def subclass_error():
    raise MyStorage("disk gone")


def value_error():
    raise ValueError("shape mismatch")


def not_json():
    return object()


def hard_exit():
    os._exit(3)
