from __future__ import annotations

import os
from pathlib import Path


def file_bytes(path: str | Path) -> int:
    """Bytes of the actual file on disk (never a parameter count)."""
    return os.stat(path).st_size
