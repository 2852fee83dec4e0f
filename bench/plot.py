"""Curves -> a PNG: the one figure style of the benchmarks (matplotlib, headless)."""

from __future__ import annotations

import os


def figure(size=(8, 5)):
    """A new (fig, ax) on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=size)


def save(fig, ax, title: str, out: str) -> None:
    """Grid, title, legend, tight layout, then the PNG at `out` (its folder made if missing)."""
    import matplotlib.pyplot as plt

    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
