"""Run folders: ownership, locking, storage errors and file modes."""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pqd.errors import DatabaseLockedError, DiskFullError, ReadOnlyStorageError, RunDirBusy, RunDirError, StorageError
from pqd.safety.fsguard import (
    LOCK,
    MARKER,
    DirLock,
    atomic_output,
    atomic_write_bytes,
    check_writable_run_dir,
    read_marker,
    safe_replace,
    storage_error,
    storage_errors,
)

RUN_FILES = ["config.yaml", "env.json", "metrics.json", "teacher.safetensors", "stage*", "model_*"]
SRC = str(Path(__file__).resolve().parents[2] / "src")


# ----------------------------------------------------------------- never overwrite user files


def test_user_config_in_out_dir_is_refused_and_kept(tmp_path: Path):
    p = tmp_path / "p"
    p.mkdir()
    (p / "config.yaml").write_text("db: {password: x}\n")
    with pytest.raises(RunDirError, match="no .pqd-run marker"):
        check_writable_run_dir(p, expected_files=RUN_FILES)
    assert (p / "config.yaml").read_text() == "db: {password: x}\n"
    assert not (p / MARKER).exists()
    with pytest.raises(RunDirError, match="was not written by pqd"):
        safe_replace(p / "config.yaml", b"stages: P:1\n")
    assert (p / "config.yaml").read_text() == "db: {password: x}\n"


def test_users_own_pqd_config_without_marker_is_refused_and_kept(tmp_path: Path):
    """A folder holding only a hand-written pqd config (pqd's file name, a valid pqd config) is
    the user's, not an older run to take over: refused, never marked, the file untouched."""
    p = tmp_path / "mine"
    p.mkdir()
    text = "# my tuned config\nstages: P:1,Q:1\nmodel: {name: resnet18, width: 0.125}\nteacher: {epochs: 3}\n"
    (p / "config.yaml").write_text(text)
    (p / "metrics.json").write_text("{}")
    (p / "stages").mkdir()
    with pytest.raises(RunDirError, match=r"holds config.yaml, metrics.json, stages but no .pqd-run marker"):
        check_writable_run_dir(p, expected_files=RUN_FILES)
    assert (p / "config.yaml").read_text() == text
    assert not (p / MARKER).exists()
    with pytest.raises(RunDirError, match="was not written by pqd"):
        safe_replace(p / "config.yaml", b"stages: P:1\n")
    assert (p / "config.yaml").read_text() == text


def test_sweep_into_users_folder_is_refused(tmp_path: Path):
    (tmp_path / "sweep.yaml").write_text("# my sweep\nbase: tiny.yaml\nvariants: {a: {}}\n")
    (tmp_path / "tiny.yaml").write_text("stages: P:1\n")
    with pytest.raises(RunDirError, match=r"files pqd did not write \(tiny.yaml\)"):
        check_writable_run_dir(tmp_path, expected_files=["sweep.yaml", "results.sqlite", "runs"], kind="sweep")
    assert (tmp_path / "sweep.yaml").read_text().startswith("# my sweep")


def test_new_empty_marked_and_legacy_folders(tmp_path: Path):
    assert check_writable_run_dir(tmp_path / "a" / "b", expected_files=RUN_FILES) == "new"
    assert read_marker(tmp_path / "a" / "b")["kind"] == "run"
    assert check_writable_run_dir(tmp_path / "a" / "b", expected_files=RUN_FILES) == "pqd"
    with pytest.raises(RunDirError, match="holds pqd run output, not sweep output"):
        check_writable_run_dir(tmp_path / "a" / "b", expected_files=[], kind="sweep")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / ".config.yaml.abc.tmp").write_bytes(b"x")  # left by a kill during an atomic write
    assert check_writable_run_dir(tmp_path / "e", expected_files=RUN_FILES) == "empty"
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(RunDirError, match="is a file, not a directory"):
        check_writable_run_dir(f, expected_files=RUN_FILES)
    with pytest.raises(
        RunDirError, match=r"--out '/proc/self/x' cannot be used as the run directory: creating .* failed"
    ):
        check_writable_run_dir("/proc/self/x", expected_files=RUN_FILES)


def test_safe_replace_rules(tmp_path: Path):
    run = tmp_path / "run"
    check_writable_run_dir(run, expected_files=RUN_FILES)
    safe_replace(run / "metrics.json", b"1")
    safe_replace(run / "metrics.json", b"2")  # ours and unchanged: replaced
    assert (run / "metrics.json").read_bytes() == b"2"
    (run / "metrics.json").write_bytes(b"edited by the user")
    with pytest.raises(RunDirError, match="changed since pqd wrote it"):
        safe_replace(run / "metrics.json", b"3")
    safe_replace(run / "metrics.json", b"3", overwrite=True)
    assert (run / "metrics.json").read_bytes() == b"3"
    # unmarked folder (e.g. `pqd export --out ~/models/m.onnx`): new files only
    user = tmp_path / "user"
    user.mkdir()
    safe_replace(user / "m.onnx", b"onnx")
    assert not (user / MARKER).exists()
    with pytest.raises(RunDirError):
        safe_replace(user / "m.onnx", b"onnx2")
    with pytest.raises(RunDirError), atomic_output(user / "m.onnx") as tmp:  # the same rule for name-taking writers
        tmp.write_bytes(b"x")
    assert (user / "m.onnx").read_bytes() == b"onnx"
    assert sorted(p.name for p in user.iterdir()) == ["m.onnx"]


# ----------------------------------------------------------------- smaller: modes follow the umask


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_modes_follow_umask(tmp_path: Path, umask: int, mode: int):
    old = os.umask(umask)
    try:
        a = safe_replace(tmp_path / "a.json", b"{}")
        b = atomic_write_bytes(tmp_path / "b.bin", b"x")
        with atomic_output(tmp_path / "c.bin") as tmp:
            tmp.write_bytes(b"y")
        check_writable_run_dir(tmp_path / "run", expected_files=[])
    finally:
        os.umask(old)
    for p in (a, b, tmp_path / "c.bin", tmp_path / "run" / MARKER):
        assert p.stat().st_mode & 0o777 == mode, p


# ----------------------------------------------------------------- one process per folder

HOLDER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {src!r})
    from pqd.safety.fsguard import DirLock
    with DirLock({path!r}):
        print("locked", flush=True)
        time.sleep(60)
""")


def test_lock_refuses_second_process_and_dies_with_holder(tmp_path: Path):
    run = tmp_path / "r"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER.format(src=SRC, path=str(run))], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirBusy, match=rf"RUN_DIR '.*r' is in use by pid {proc.pid}"):
            DirLock(run).acquire()
    finally:
        proc.kill()  # kill -9: the kernel drops the lock, nothing stale remains
        proc.wait()
    with DirLock(run) as lock:
        with DirLock(run):  # re-entrant in one process
            pass
        assert json.loads((run / LOCK).read_text())["pid"] == os.getpid()
    assert lock._key is None


# ----------------------------------------------------------------- storage errors


def test_disk_full_on_write_keeps_old_file_and_no_partial(tmp_path: Path, monkeypatch):
    run = tmp_path / "run"
    check_writable_run_dir(run, expected_files=RUN_FILES)
    safe_replace(run / "metrics.json", b"old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(DiskFullError, match=r"no space left on the device while writing '.*metrics.json'"):
        safe_replace(run / "metrics.json", b"new")
    monkeypatch.undo()
    assert (run / "metrics.json").read_bytes() == b"old"
    assert sorted(p.name for p in run.iterdir()) == [MARKER, "metrics.json"]


def test_real_enospc_from_dev_full():
    try:
        with open("/dev/full", "wb") as f:
            f.write(b"x")
        pytest.skip("/dev/full does not report ENOSPC in this sandbox")
    except OSError:
        pass
    with pytest.raises(DiskFullError, match="/dev/full"), storage_errors("/dev/full"), open("/dev/full", "wb") as f:
        f.write(b"x" * 10)


def test_atomic_output_failure_removes_temp(tmp_path: Path):
    with (
        pytest.raises(ReadOnlyStorageError, match="read-only file system"),
        atomic_output(tmp_path / "model.pt") as tmp,
    ):
        tmp.write_bytes(b"half")
        raise OSError(errno.EROFS, "Read-only file system")
    assert list(tmp_path.iterdir()) == []


def test_safetensors_os_error_28():
    from safetensors import SafetensorError

    exc = SafetensorError(
        'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
    )
    err = storage_error(exc, "/runs/r/stage1_prune/checkpoint.safetensors")
    assert isinstance(err, DiskFullError) and "checkpoint.safetensors" in str(err)
    assert storage_error(SafetensorError("invalid header"), "x") is None  # not a storage failure: left to the caller


def test_sqlite_disk_full_and_locked(tmp_path: Path):
    db_path = tmp_path / "results.sqlite"
    db = sqlite3.connect(db_path)
    db.execute("CREATE TABLE runs (name TEXT, blob BLOB)")
    db.commit()
    db.execute("PRAGMA max_page_count = 8")  # a full disk, in miniature
    with pytest.raises(DiskFullError, match="results.sqlite"), storage_errors(db_path):
        db.execute("INSERT INTO runs VALUES ('a', ?)", (b"x" * 100_000,))
    db.rollback()
    db.execute("BEGIN EXCLUSIVE")
    other = sqlite3.connect(db_path, timeout=0.05)
    with pytest.raises(DatabaseLockedError, match="stayed locked by another process"), storage_errors(db_path):
        other.execute("INSERT INTO runs VALUES ('b', NULL)")
    db.rollback()
    bad = tmp_path / "garbled.sqlite"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StorageError, match="not a readable SQLite database"), storage_errors(bad, action="reading"):
        sqlite3.connect(bad).execute("SELECT * FROM runs").fetchall()


def test_non_utf8_path_and_unrelated_errors(tmp_path: Path):
    weird = os.fsdecode(os.fsencode(str(tmp_path)) + b"/caf\xe9")
    with pytest.raises(StorageError, match="cannot be encoded"), storage_errors(weird):
        weird.encode("utf-8")
    with pytest.raises(KeyError), storage_errors(tmp_path / "x"):  # not a storage failure: unchanged
        raise KeyError("k")
    with pytest.raises(StorageError, match="symbolic links"):
        (tmp_path / "loop").symlink_to(tmp_path / "loop")
        with storage_errors(tmp_path / "loop", action="reading"):
            (tmp_path / "loop").read_bytes()


def test_rescue_write_keeps_results_when_the_final_write_fails(tmp_path: Path, monkeypatch):
    from pqd.safety.fsguard import rescue_write

    real_replace = os.replace

    def full(src, dst):
        if str(dst).endswith("bench.json"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(DiskFullError, match=r"The data was saved to .*pqd-rescue-.*-bench.json") as info:
        rescue_write(tmp_path / "bench.json", b'{"hours": "of timing"}')
    monkeypatch.undo()
    assert Path(info.value.rescue_path).read_bytes() == b'{"hours": "of timing"}'
    assert list(tmp_path.iterdir()) == []
    Path(info.value.rescue_path).unlink()


def test_every_pqd_writer_records_so_safe_replace_keeps_working(tmp_path: Path):
    # `pqd bench` rewrites metrics.json with the plain atomic writer; a later `pqd run`
    # re-measuring the run must still be allowed to replace it
    from pqd.safety.fsguard import record_written

    run = tmp_path / "run"
    check_writable_run_dir(run, expected_files=RUN_FILES)
    safe_replace(run / "metrics.json", b"run")
    atomic_write_bytes(run / "metrics.json", b"bench merged")
    safe_replace(run / "metrics.json", b"run again")
    (run / "teacher.safetensors").write_bytes(b"written by a library")  # e.g. safetensors.save_file
    record_written(run / "teacher.safetensors")
    safe_replace(run / "teacher.safetensors", b"new")
    assert (run / "teacher.safetensors").read_bytes() == b"new"


def test_non_utf8_out_path_refused_before_any_work(tmp_path: Path):
    from pqd.safety.fsguard import check_path_encodable

    weird = os.fsdecode(os.fsencode(str(tmp_path)) + b"/run-caf\xe9")
    with pytest.raises(StorageError, match=r"run-caf\\xe9' is not a UTF-8 path"):
        check_path_encodable(weird)
    check_path_encodable(tmp_path / "café")


@pytest.mark.parametrize("writer", ["safe_replace", "atomic_write_bytes", "atomic_output", "commit_file"])
def test_kill_between_rename_and_manifest_update_keeps_the_file_ours(tmp_path: Path, monkeypatch, writer):
    """The kill/resume guarantee: a kill right after a file's rename (before the manifest
    records it) must not make pqd refuse its own file on resume."""
    import pqd.safety.fsguard as fg

    run = tmp_path / "run"
    check_writable_run_dir(run, expected_files=RUN_FILES)
    safe_replace(run / "metrics.json", b"first")
    real, calls = fg._write_marker, []

    def killed_after_rename(folder, rec):
        calls.append(1)
        if len(calls) == 2:  # 1: pending record before the rename, 2: the final record after it
            raise KeyboardInterrupt("kill -9")
        real(folder, rec)

    monkeypatch.setattr(fg, "_write_marker", killed_after_rename)
    with pytest.raises(KeyboardInterrupt):
        if writer == "atomic_output":
            with atomic_output(run / "metrics.json") as tmp:
                tmp.write_bytes(b"second")
        elif writer == "commit_file":
            (run / ".metrics.json.x.tmp").write_bytes(b"second")
            fg.commit_file(run / ".metrics.json.x.tmp", run / "metrics.json")
        else:
            getattr(fg, writer)(run / "metrics.json", b"second")
    monkeypatch.undo()
    assert (run / "metrics.json").read_bytes() == b"second"
    safe_replace(run / "metrics.json", b"third")  # resumed run: still pqd's file
    assert read_marker(run)["files"]["metrics.json"] == [__import__("hashlib").sha256(b"third").hexdigest()]


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES, errno.ENOSPC, errno.ENAMETOOLONG])
def test_storage_messages_name_no_option_a_command_lacks(tmp_path: Path, code):
    """export and bench write into the run folder and have no --out: the advice must fit them too."""
    err = storage_error(OSError(code, os.strerror(code), str(tmp_path / "run" / "export.json")), tmp_path)
    assert err is not None and "--out" not in str(err).replace("run/sweep: another --out", ""), str(err)
    if code in (errno.EROFS, errno.EACCES):
        assert "export/bench: copy the run folder to a writable place first" in str(err)
    (tmp_path / "m.onnx").write_bytes(b"x")
    with pytest.raises(RunDirError) as exc:
        safe_replace(tmp_path / "m.onnx", b"y")
    assert "--out" not in str(exc.value)
