"""Where saelab keeps what it makes once for this user: ``$SAELAB_CACHE_DIR``, default ``~/.cache/saelab``."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_DIR_ENV = "SAELAB_CACHE_DIR"


def cache_dir() -> Path:
    """``$SAELAB_CACHE_DIR`` or ``~/.cache/saelab`` (downloads, the local key, corpus fingerprints); it may not
    exist, nor be writable."""
    root = os.environ.get(CACHE_DIR_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "saelab"
