"""Matplotlib figures for a run (PNG, written atomically, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from saelab.utils.atomic import atomic_path  # noqa: E402


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def training_curves(metrics: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Training nMSE and the fraction of inactive/dead latents against tokens."""
    tokens = np.array([m["tokens"] for m in metrics])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(tokens, [m["nmse"] for m in metrics], label="nMSE (train batch)")
    if any(m.get("auxk", 0) > 0 for m in metrics):
        ax1.plot(tokens, [m["auxk"] for m in metrics], label="AuxK loss", alpha=0.7)
    ax1.set_xlabel("training tokens")
    ax1.set_ylabel("loss")
    ax1.set_yscale("log")
    ax1.grid(alpha=0.3)
    ax1.legend()
    ax2.plot(tokens, [100 * m["inactive_frac"] for m in metrics], label="inactive (no fire in 262k tokens)")
    ax2.plot(tokens, [100 * m["dead_frac"] for m in metrics], label="dead (AuxK window)")
    ax2.set_xlabel("training tokens")
    ax2.set_ylabel("% of latents")
    ax2.grid(alpha=0.3)
    ax2.legend()
    fig.suptitle("Training")
    return _save(fig, Path(path))


def density_histogram(frequencies_N: torch.Tensor, path: str | Path, n_tokens: int) -> Path:
    """Histogram of log10 latent firing frequency on the eval tokens (dead latents counted apart)."""
    freq = frequencies_N.double().numpy()
    alive = freq[freq > 0]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    if alive.size:
        ax.hist(np.log10(alive), bins=60, color="#3b6ea8")
    ax.set_xlabel("log10 firing frequency")
    ax.set_ylabel("latents")
    ax.set_title(f"Latent density on {n_tokens:,} eval tokens ({(freq == 0).sum():,} never fired)")
    ax.grid(alpha=0.3)
    return _save(fig, Path(path))
