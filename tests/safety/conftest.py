"""Shared fixture: a run folder as a user might download it, whose config names a model in a
module of that folder (``helpers:resnet18``); importing the module writes a canary file."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture()
def downloaded_run(tmp_path: Path, monkeypatch) -> tuple[Path, Path]:
    """``(run folder, canary path)``; the folder is the working directory and on ``sys.path``."""
    run = tmp_path / "downloaded_run"
    run.mkdir()
    (run / "config.yaml").write_text("stages: P:1,Q:1\nmodel: {name: 'helpers:resnet18'}\n")
    canary = tmp_path / "pwned"
    (run / "helpers.py").write_text(f"open({str(canary)!r}, 'w').write('ran')\ndef resnet18(**kw): raise SystemExit\n")
    monkeypatch.chdir(run)
    monkeypatch.syspath_prepend(str(run))  # "with the current directory on sys.path"
    return run, canary
