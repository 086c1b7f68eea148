"""The sha256 of files' bytes."""

from __future__ import annotations

import hashlib
import os


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes (hex): a download's check, a browser site's record of its files."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
