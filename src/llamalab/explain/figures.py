"""Plotting helpers: headless matplotlib, one PNG per figure, consistent small sizes and labels."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display needed; must precede pyplot

import matplotlib.pyplot as plt  # noqa: E402

plt.rcParams.update({"figure.dpi": 100, "savefig.dpi": 100, "font.size": 9, "axes.grid": True,
                     "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False,
                     "legend.fontsize": 8, "axes.titlesize": 10})


def new(ncols: int = 1, nrows: int = 1, width: float = 6.4, height: float = 3.6, **kw):
    return plt.subplots(nrows, ncols, figsize=(width, height), **kw)


def save(fig, out_dir: Path, name: str) -> str:
    """Write ``name``.png into out_dir, close the figure, return the file name (relative to the report)."""
    if not fig.get_constrained_layout():
        fig.tight_layout()
    path = Path(out_dir) / f"{name}.png"
    fig.savefig(path)
    plt.close(fig)
    return path.name
