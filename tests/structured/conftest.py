from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("torch_pruning")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "robustness"))  # pqd_user_models
sys.path.insert(0, str(Path(__file__).resolve().parent))  # structured_user_models
