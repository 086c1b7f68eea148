"""What names an SAE and its latents before any SAE loads: where an SAE may come from, the formats and files it
is saved in, the folders that hold one (a run's) or were made from one, and a list of latents checked. No torch
here: the command line's parser and its checks read these, and saelab.run_folder builds on them."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from saelab.errors import ConfigError
from saelab.utils.atomic import SET_ASIDE

WEIGHTS_FILENAME = "sae_weights.safetensors"
"""A SAELens folder's weights (beside its cfg.json)."""
SPARSIFY_WEIGHTS_FILENAME = "sae.safetensors"
"""A sparsify folder's weights (beside its cfg.json)."""
HF_PREFIX = "hf://"
SAVE_FORMATS = ("saelens", "sparsify")

SAE_SOURCES = (f"a run folder (saelab train), a SAELens folder (cfg.json + {WEIGHTS_FILENAME}), a sparsify "
               f"folder (cfg.json + {SPARSIFY_WEIGHTS_FILENAME}), an OpenAI .pt file, an https:// URL or "
               f"{HF_PREFIX}owner/repo/path")
"""What can be given where an SAE is expected: the one phrase of the CLI's help and of the refusals."""

TRAIN_CONFIG = "train_config.json"
SAE_DIR = "sae"
CHECKPOINT = "checkpoint.pt"
"""What marks a run folder (``saelab train --out RUN``), where its SAE is and its training checkpoint (no SAE):
here, below :mod:`saelab.run_folder` (which lists a run's other files), so that saving can refuse a run and
loading can name one."""
SITE_MANIFEST = "site.json"
"""Written last into a feature browser site (explore/browser/site.py): it marks a finished one."""
NEURONPEDIA_SETTINGS = "run_settings.json"
"""saelab's record beside a Neuronpedia export's batch files (explore/browser/export.py)."""

MADE_FROM_SAES = ((SITE_MANIFEST, "a feature browser site"), (NEURONPEDIA_SETTINGS, "a Neuronpedia export"))
"""Folders made from SAEs, by the file that marks each, and their names in messages: given for an SAE, they are
named, not taken for an SAE whose save was cut short (nor, given for a run, for one: run_folder.NOT_A_RUN)."""


def holds_a_run(path: Path) -> bool:
    """A run folder, finished or not: an overwrite's first moments hold only the earlier run, set aside."""
    return any(config.is_file() for config in run_configs(path))


def run_configs(path: Path) -> tuple[Path, Path]:
    """Where a run folder keeps its train_config.json: in it, or in the run an overwrite set aside in it."""
    return path / TRAIN_CONFIG, path / SET_ASIDE / TRAIN_CONFIG


def run_folders_in(folder: str | os.PathLike) -> list[Path]:
    """The folders directly inside ``folder`` that may be runs (a sweep's), in natural order (n4096 before
    n16384). Hidden folders are not: an overwrite keeps the run it replaces in RUN/.set-aside/."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    runs = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return sorted(runs, key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)])


def check_latents_once(latents, given: Any = None) -> None:
    """Refuse a latent listed twice: top would show it twice, steer add (or clamp) it twice. ``given``: the
    latents as the user gave them, for the message (the command line's text '5,5'; default the list)."""
    seen: set = set()
    for i in latents:
        if i in seen:
            shown = list(latents) if given is None else given
            raise ConfigError(f"latent {i} given twice in {shown!r}; give each latent once")
        seen.add(i)
