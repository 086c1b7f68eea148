"""Matplotlib figures without global state: ``Figure`` objects (no pyplot, no backend to pick, no
display needed) saved atomically.

matplotlib (~0.4 s to import) is imported where a figure is made: every saelab command imports the report's
modules, and --help or a refused option should not wait for it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from saelab.errors import ConfigError
from saelab.utils.atomic import atomic_path, check_file_target

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def figure(nrows: int = 1, ncols: int = 1, figsize: tuple[float, float] = (6, 3.6), dpi: int | None = None):
    """A new figure and its axes (an array of them when there are several)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")  # side-by-side panels' labels do not collide
    return fig, fig.subplots(nrows, ncols)


def check_figure_path(path: str | Path, named: str) -> Path:
    """``path`` checked, before the work that draws it, as where save_figure can write a figure: a file path in a
    writable folder, in a format matplotlib writes (none: png)."""
    from matplotlib.figure import Figure

    path = check_file_target(path, named, "the figure")
    kinds = set(Figure().canvas.get_supported_filetypes()) - {"pgf"}  # pgf needs a TeX install to write
    if path.suffix and path.suffix.lstrip(".").lower() not in kinds:
        raise ConfigError(f"{named} {path}: expected an image file ({', '.join('.' + k for k in sorted(kinds))})")
    return path


def save_figure(fig: Figure, path: str | Path, dpi: int = 110) -> Path:
    """Write ``fig`` atomically to ``path`` (format from the suffix)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=dpi, bbox_inches="tight")
    return path
