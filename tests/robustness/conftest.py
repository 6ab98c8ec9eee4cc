"""Fixtures of the robustness tests; the helpers live in ``rbhelpers.py``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
if str(HERE) not in sys.path:  # rbhelpers and pqd_user_models (the latter by import path 'pqd_user_models:factory')
    sys.path.insert(0, str(HERE))


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Decoded image folders are cached under tmp_path, never in ~/.cache/pqd."""
    monkeypatch.setenv("PQD_CACHE", str(tmp_path / "pqd-cache"))
