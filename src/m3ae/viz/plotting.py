"""Matplotlib without a display, and figures written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..utils import atomic_path, require


def pyplot():
    matplotlib = require("matplotlib", "viz", "figures")
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


# pretraining's terms, then a probe's or fine-tuning's (metrics.jsonl per epoch), then the lr
CURVES = ("loss", "image_loss", "text_loss", "text_accuracy", "unpaired_text_loss", "train_loss", "top1", "top5", "lr")


def loss_curves_figure(records: list[dict[str, Any]]):
    """One panel per logged quantity against the step; None when nothing was logged."""
    keys = [k for k in CURVES if any(k in r for r in records)]
    if not keys:
        return None
    fig, axes = pyplot().subplots(1, len(keys), figsize=(3.6 * len(keys), 3.0), squeeze=False)
    for ax, key in zip(axes[0], keys):
        points = [(r["step"], r[key]) for r in records if key in r and "step" in r]
        # a probe logs once per epoch: a short run's few points need markers to be seen at all
        ax.plot(*zip(*points), marker="o" if len(points) < 30 else None, markersize=3)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        if key.endswith("loss"):
            ax.set_yscale("log")
    fig.tight_layout()
    return fig
