"""The paper's Fig. 9: t-SNE of image features coloured by label, one panel per model (M3AE beside MAE)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def embed_2d(features: np.ndarray, seed: int = 0, perplexity: float = 30.0, max_iter: int = 1000) -> np.ndarray:
    """(N, D) -> (N, 2) with scikit-learn's t-SNE (PCA initialisation, deterministic for a seed)."""
    from ..utils import require

    TSNE = require("sklearn.manifold", "viz", "t-SNE").TSNE
    perplexity = min(perplexity, max(1.0, (features.shape[0] - 1) / 3))  # t-SNE needs N > 3·perplexity
    # small sets: the exact gradient is cheaper than Barnes-Hut's threaded tree code
    method = "exact" if features.shape[0] <= 500 else "barnes_hut"
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed, max_iter=max_iter,
                method=method).fit_transform(
        np.asarray(features, dtype=np.float32)
    )


def plot_tsne(
    panels: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path, class_names: list[str] | None = None,
    seed: int = 0,
) -> Path:
    """panels {model name: (features (N, D), labels (N,))} -> one scatter per model, shared colours."""
    from .plotting import pyplot, save_figure

    plt = pyplot()
    labels_all = np.unique(np.concatenate([labels for _, labels in panels.values()]))
    cmap = plt.get_cmap("tab10" if len(labels_all) <= 10 else "tab20")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels), 5.0), squeeze=False)
    for ax, (name, (features, labels)) in zip(axes[0], panels.items()):
        points = embed_2d(features, seed)
        for i, label in enumerate(labels_all):
            chosen = labels == label
            name_of = class_names[int(label)] if class_names else str(label)
            ax.scatter(points[chosen, 0], points[chosen, 1], s=6, color=cmap(i % cmap.N), label=name_of)
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, -1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, markerscale=2)
    fig.tight_layout()
    return save_figure(fig, path)
