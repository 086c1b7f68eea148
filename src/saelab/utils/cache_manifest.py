"""What marks a folder as an activation cache (:mod:`saelab.data.cache` writes it): here, below ``saelab.sae`` and
``saelab.run_folder``, so that saving an SAE can refuse a cache folder and the run-folder layout can name one."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

FORMAT = "saelab-activation-cache"
MANIFEST = "manifest.json"
OVERWRITE_STAGE = ".overwrite"
"""Where ``harvest --overwrite`` writes the new cache before moving it in over the old one."""


def is_cache_manifest(manifest: Any) -> bool:
    """Whether a parsed manifest.json is an activation cache's (its other fields are the reader's to check)."""
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT


def holds_an_activation_cache(folder: str | os.PathLike) -> bool:
    """A folder whose manifest.json is an activation cache's, finished or not, or whose overwrite stage holds one
    (an overwrite interrupted while moving its cache in has no manifest.json of its own); another tool's
    manifest.json is not one."""
    return any(_reads_as_cache_manifest(Path(folder, *stage, MANIFEST)) for stage in ((), (OVERWRITE_STAGE,)))


def _reads_as_cache_manifest(path: Path) -> bool:
    try:
        return is_cache_manifest(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
