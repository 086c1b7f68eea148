"""Where saelab keeps what it makes once for this user: ``$SAELAB_CACHE_DIR``, default ``saelab`` in the user's
cache folder (``$XDG_CACHE_HOME`` or ``~/.cache``)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_DIR_ENV = "SAELAB_CACHE_DIR"


def cache_dir() -> Path:
    """``$SAELAB_CACHE_DIR``, else ``$XDG_CACHE_HOME/saelab``, else ``~/.cache/saelab`` (dequantized models,
    downloads, the local key, corpus fingerprints); it may not exist, nor be writable."""
    root = os.environ.get(CACHE_DIR_ENV)
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "saelab"
