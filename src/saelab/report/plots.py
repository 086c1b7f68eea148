"""Matplotlib figures for a run (PNG, written atomically, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from saelab.train.trainer import INACTIVE_WINDOW
from saelab.utils.figures import figure, save_figure

if TYPE_CHECKING:  # matplotlib loads where a figure is drawn (saelab.utils.figures says why)
    from matplotlib.figure import Figure


def training_curves(metrics: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Training nMSE and the fraction of inactive/dead latents against tokens, drawn to ``path``."""
    return save_figure(training_curves_figure(metrics), Path(path))


def training_curves_figure(metrics: Sequence[dict[str, Any]]) -> Figure:
    """The figure :func:`training_curves` draws (from metrics.jsonl's records)."""
    from matplotlib.ticker import EngFormatter

    tokens = np.array([m["tokens"] for m in metrics])
    style = {"marker": "o", "markersize": 3} if len(metrics) < 30 else {}  # a short run's few points stay visible
    fig, (ax1, ax2) = figure(1, 2, figsize=(10, 3.6))
    ax1.plot(tokens, [m["nmse"] for m in metrics], label="nMSE (train batch)", **style)
    auxk = np.array([m.get("auxk", 0.0) for m in metrics], dtype=float)
    on = auxk > 0
    if on.any():
        # AuxK trains the dead latents only: 0 at steps with none, which the log axis cannot show (the line
        # fell off it). NaN leaves those steps out: gaps where it was inactive. The dead set AuxK uses is the
        # one at the step's start; the right panel's dead share is the one after it, a step later.
        label = "AuxK loss" if on.all() else "AuxK loss (gaps: no latent dead at the step's start)"
        [line] = ax1.plot(tokens, np.where(on, auxk, np.nan), label=label, alpha=0.7, **style)
        alone = on & ~np.r_[False, on[:-1]] & ~np.r_[on[1:], False]
        if alone.any() and not style:  # a step between two gaps draws no segment: a marker shows it
            ax1.plot(tokens[alone], auxk[alone], linestyle="none", marker="o", markersize=3, alpha=0.7,
                     color=line.get_color())
    ax1.set_xlabel("training tokens")
    ax1.set_ylabel("loss")
    ax1.set_yscale("log")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8, framealpha=0.7)
    # Before the window has passed no latent can have gone that long without firing: not measured, not 0 %.
    seen = tokens >= INACTIVE_WINDOW
    inactive = [100 * m["inactive_frac"] for m, ok in zip(metrics, seen) if ok]
    if inactive:
        ax2.plot(tokens[seen], inactive, label=f"inactive (no fire in {INACTIVE_WINDOW:,} tokens)", **style)
    else:  # a legend line with no line drawn reads as a curve hidden somewhere: words alone
        ax2.plot([], [], linestyle="none", label=f"inactive: not measured (under {INACTIVE_WINDOW:,} tokens)")
    dead = [100 * m["dead_frac"] for m in metrics]
    ax2.plot(tokens, dead, label="dead (AuxK window)", **style)
    ax2.set_xlabel("training tokens")
    ax2.set_ylabel("% of latents")
    # A share: no room below 0 %; room above the highest point, which a flat line would otherwise put on the frame
    ax2.set_ylim(0, max(1.0, 1.1 * max(dead + inactive)))
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8, framealpha=0.7)
    for ax in (ax1, ax2):  # "12k", not 12000 run into its neighbours
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    fig.suptitle("Training")
    return fig


def density_histogram(frequencies_N: torch.Tensor, path: str | Path, n_tokens: int) -> Path:
    """Histogram of log10 latent firing frequency on the eval tokens (dead latents counted apart)."""
    freq = frequencies_N.double().numpy()
    alive = freq[freq > 0]
    fig, ax = figure(figsize=(6, 3.6))
    if alive.size:
        ax.hist(np.log10(alive), bins=60, color="#3b6ea8")
    ax.set_xlabel("log10 firing frequency")
    ax.set_ylabel("latents")
    ax.set_title(f"Latent density on {n_tokens:,} eval tokens ({(freq == 0).sum():,} never fired)")
    ax.grid(alpha=0.3)
    return save_figure(fig, Path(path))


def compute_equivalent_plot(result: dict[str, Any], path: str | Path) -> Path:
    """Reference losses against compute (a family's members in FLOPs, or one run's checkpoints in
    tokens), the fitted L(C), and the clean and spliced losses."""
    from saelab.evals.compute_equivalent import KIND_FAMILY, KIND_TITLES, format_fraction_interval, upgrade_result

    result = upgrade_result(result)
    family = result["kind"] == KIND_FAMILY
    rows = [r for r in result["checkpoints"] if r["compute"] > 0]
    fit = result["fit"]
    fig, ax = figure(figsize=(7, 4.2))
    what = "members" if family else "checkpoints"
    used = [r for r in rows if r["used_in_fit"]]
    unused = [r for r in rows if not r["used_in_fit"]]
    ax.scatter([r["compute"] for r in used], [r["loss"] for r in used], color="#3b6ea8", zorder=3,
               label=f"{what} (fitted)")
    if unused:
        ax.scatter([r["compute"] for r in unused], [r["loss"] for r in unused], facecolors="none",
                   edgecolors="#3b6ea8", zorder=3, label=f"{what} (not fitted)")
    if family:
        for r in rows:
            ax.annotate(r["label"], (r["compute"], r["loss"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    lo = min(r["compute"] for r in rows)
    hi = max([r["compute"] for r in rows]
             + [result.get("compute_equivalent") or 0, result.get("reference_compute") or 0])
    grid = np.logspace(np.log10(lo) - 0.2, np.log10(hi) + 0.2, 200)
    ax.plot(grid, fit["a"] * grid ** (-fit["b"]) + fit["c"], color="#888888",
            label=f"fit {fit['a']:.3g} C^-{fit['b']:.3f} + {fit['c']:.3f}")
    ax.axhline(result["spliced_loss"], color="#c0392b", ls="--", label=f"SAE spliced {result['spliced_loss']:.3f}")
    if result.get("clean_loss") is not None:
        ax.axhline(result["clean_loss"], color="#27ae60", ls=":", label=f"clean {result['clean_loss']:.3f}")
    c_star = result["compute_equivalent"] if fit["method"] == "power" else result["compute_equivalent_interp"]
    if c_star:
        ax.axvline(c_star, color="#c0392b", lw=0.8)
    if result.get("reference_compute"):
        ax.axvline(result["reference_compute"], color="#27ae60", lw=0.8, ls=":")
    frac = result.get("fraction")
    whose = "of the model's compute" if family else "of the run's training tokens"
    extra = f", extrapolated ({result['extrapolation']})" if result.get("extrapolated") else ""
    title = (f"{result['series']['name']}: {KIND_TITLES[result['kind']]} "
             + (f"{frac:.3g}{format_fraction_interval((result.get('intervals') or {}).get('fraction'), '{:.3g}')} "
                f"{whose}" if frac is not None else "not reached") + extra)
    ax.set_title(title, fontsize=10)
    ax.set_xscale("log")
    ax.set_xlabel("training compute C = 6 N D (FLOPs, N non-embedding)" if family else
                  "training tokens of one run (training progress)")
    ax.set_ylabel("CE loss on eval tokens (nats)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return save_figure(fig, Path(path))


def probe_plot(result: dict[str, Any], path: str | Path) -> Path:
    """Held-out probe loss per task: best SAE latent, best residual channel, and the label entropy."""
    tasks = list(result["tasks"])
    x = np.arange(len(tasks))
    fig, ax = figure(figsize=(max(5, 0.9 * len(tasks) + 2), 3.8))
    get = lambda key: [result["tasks"][t][key] if result["tasks"][t][key] is not None else np.nan for t in tasks]  # noqa: E731
    ax.bar(x - 0.27, get("loss"), 0.27, label="best SAE latent", color="#3b6ea8")
    ax.bar(x, get("baseline_loss"), 0.27, label="best residual channel", color="#aaaaaa")
    ax.bar(x + 0.27, get("entropy"), 0.27, label="constant (label entropy)", color="#e0c080")
    ax.set_xticks(x, tasks, rotation=30, ha="right")
    ax.set_ylabel("held-out CE (nats)")
    ax.set_title("1-D probe loss per task (lower is better)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return save_figure(fig, Path(path))


def n2g_plot(result: dict[str, Any], path: str | Path) -> Path:
    """N2G precision against recall per explained latent, and the F1 histogram."""
    rows = [r for r in result["per_latent"] if r["precision"] is not None and r["recall"] is not None]
    fig, (ax1, ax2) = figure(1, 2, figsize=(10, 3.8))
    ax1.scatter([r["recall"] for r in rows], [r["precision"] for r in rows], s=14, color="#3b6ea8")
    ax1.set_xlim(-0.02, 1.02)
    ax1.set_ylim(-0.02, 1.02)
    ax1.set_xlabel("recall")
    ax1.set_ylabel("precision")
    ax1.set_title(f"{len(rows)} latents with both defined")
    ax1.grid(alpha=0.3)
    f1 = [r["f1"] for r in result["per_latent"] if r["f1"] is not None]
    ax2.hist(f1, bins=20, range=(0, 1), color="#3b6ea8")
    ax2.set_xlabel("F1")
    ax2.set_ylabel("latents")
    ax2.set_title("N2G explanation F1 on held-out text")
    ax2.grid(alpha=0.3)
    return save_figure(fig, Path(path))
