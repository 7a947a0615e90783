"""Figures written as PNG files. matplotlib is imported on first use, so that commands which draw
nothing do not pay for its import."""

from __future__ import annotations

import os

from loramoe.fileio import atomic_write


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend: files only, so no display is needed on servers and in CI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike, **savefig) -> None:
    """Write ``fig`` to ``path`` as a 110 dpi PNG, atomically and with the mode the umask gives a new
    file, and close it (pyplot keeps every open figure alive). ``savefig`` goes to ``Figure.savefig``."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, **savefig))
    pyplot().close(fig)
