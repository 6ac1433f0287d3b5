"""Matplotlib without a display, and figures written atomically."""

from __future__ import annotations

from pathlib import Path

from ..utils import atomic_path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int = 100) -> Path:
    """Writes `fig` to `path` (format from the suffix, PNG by default) and closes it."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=dpi)
    pyplot().close(fig)
    return path
