"""Save and load SAEs: one entry point for every format saelab reads.

``save_sae`` writes a SAELens-layout folder (see :mod:`saelab.sae.saelens_format`).
``load_sae`` takes any of:

- a SAELens folder (``cfg.json`` + ``sae_weights.safetensors``), written by saelab or by SAELens;
- an OpenAI ``sparse_autoencoder`` v5 ``.pt`` file (see :mod:`saelab.sae.openai_format`);
- an ``https://`` URL of such a ``.pt`` file, e.g. ``openai_v5_url(8)``. It is downloaded once into
  ``$SAELAB_CACHE_DIR/downloads`` (default ``~/.cache/saelab/downloads``), at a path that mirrors the URL.

Every failure is a :class:`CheckpointError` naming the file (or URL) and what was expected.
"""

from __future__ import annotations

import os
import shutil
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import torch

from saelab.errors import CheckpointError
from saelab.sae.openai_format import (
    OPENAI_LOCATION_TO_HOOK,
    openai_hook_name,
    openai_v5_url,
    read_openai_v5,
)
from saelab.sae.saelens_format import (
    CFG_FILENAME,
    WEIGHTS_FILENAME,
    read_saelens_folder,
    read_sparsity,
    write_saelens_folder,
)
from saelab.sae.topk import TopKSAE
from saelab.utils.atomic import atomic_path

DOWNLOAD_TIMEOUT_S = 60.0
_URL_SCHEMES = ("https://", "http://")


def save_sae(
    sae: TopKSAE,
    folder: str | os.PathLike,
    *,
    sparsity_log10: torch.Tensor | None = None,
    extra_files: dict[str, Any] | None = None,
) -> Path:
    """Write ``sae`` as a SAELens folder and return its path.

    ``sparsity_log10`` (one value per latent) goes to ``sparsity.safetensors``. ``extra_files`` maps plain file
    names to bytes, text, or JSON-able dicts/lists (e.g. a training config) written beside the weights.
    Files are written atomically and ``cfg.json`` last, so a folder with ``cfg.json`` is complete.
    """
    return write_saelens_folder(sae, folder, sparsity_log10=sparsity_log10, extra_files=extra_files)


def load_sae(
    source: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> TopKSAE:
    """Load a SAELens folder, an OpenAI v5 ``.pt`` file, or an ``https://`` URL of one, as a TopKSAE."""
    if isinstance(source, str) and source.startswith(_URL_SCHEMES):
        return read_openai_v5(download(source), device=device, dtype=dtype, url=source)
    path = Path(source).expanduser()
    if not path.exists():
        raise CheckpointError(
            f"{path}: no such file or folder; expected a SAELens folder (cfg.json + {WEIGHTS_FILENAME}), "
            "an OpenAI .pt file, or an https:// URL"
        )
    if path.is_file() and path.name in (CFG_FILENAME, WEIGHTS_FILENAME):
        path = path.parent  # pointing at a file inside the folder means the folder
    if path.is_dir():
        if not (path / CFG_FILENAME).exists():
            found = sorted(p.name for p in path.iterdir())[:8]
            raise CheckpointError(
                f"{path}: folder has no {CFG_FILENAME} (found {found}); expected a SAELens folder with "
                f"{CFG_FILENAME} and {WEIGHTS_FILENAME} ({CFG_FILENAME} is written last, so the save may be incomplete)"
            )
        return read_saelens_folder(path, device=device, dtype=dtype)
    return read_openai_v5(path, device=device, dtype=dtype)


# ---- downloads -------------------------------------------------------------------------------------


def download_dir() -> Path:
    """Where downloaded checkpoints are kept: ``$SAELAB_CACHE_DIR/downloads`` or ``~/.cache/saelab/downloads``."""
    root = os.environ.get("SAELAB_CACHE_DIR")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "saelab") / "downloads"


def _cache_path(url: str) -> Path:
    parts = urllib.parse.urlsplit(url)
    segments = [urllib.parse.unquote(s) for s in parts.path.split("/") if s]
    # The URL path becomes a path on disk: refuse anything that could step outside the cache.
    if not parts.hostname or not segments or any(s in (".", "..") or "/" in s or "\\" in s for s in segments):
        raise CheckpointError(f"{url}: not a downloadable checkpoint URL (expected https://host/.../name.pt)")
    if not segments[-1].endswith(".pt"):
        raise CheckpointError(f"{url}: only OpenAI sparse_autoencoder .pt files can be loaded from a URL")
    host = parts.hostname + (f"_{parts.port}" if parts.port else "")
    return download_dir() / host / Path(*segments)


def download(url: str, *, timeout: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """Download ``url`` into the cache (atomically, once) and return the local path."""
    target = _cache_path(url)
    if target.is_file():
        return target
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, atomic_path(target) as tmp:
            expected = response.headers.get("Content-Length")
            with open(tmp, "wb") as out:
                shutil.copyfileobj(response, out, length=1 << 20)
            got = tmp.stat().st_size
            if expected is not None and got != int(expected):
                raise CheckpointError(f"{url}: download stopped after {got} of {expected} bytes")
    except CheckpointError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise CheckpointError(
            f"{url}: download failed ({reason}); to work offline, place the file at {target}"
        ) from e
    return target


__all__ = [
    "OPENAI_LOCATION_TO_HOOK",
    "download",
    "download_dir",
    "load_sae",
    "openai_hook_name",
    "openai_v5_url",
    "read_sparsity",
    "save_sae",
]
