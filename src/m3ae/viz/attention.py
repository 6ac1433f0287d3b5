"""The paper's attention analyses (Figures 7 and 8) from an unmasked forward over image + caption.

Fig. 7: for a chosen word, its attention over the image patches, as a heat map on the image.
Fig. 8: for a chosen patch, its attention over the caption's words, as shaded words.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..model import M3AE
from .plotting import pyplot, save_figure


@torch.no_grad()
def attention_matrix(
    model: M3AE,
    image: torch.Tensor,
    text: torch.Tensor,
    text_padding_mask: torch.Tensor,
    layer: int | str = -1,
    head: int | str = "mean",
) -> torch.Tensor:
    """(B, S, S) attention probabilities over `[CLS, N patches, L words]`, each row summing to one.
    `layer`: an index, or "mean" over layers; `head`: an index, "mean" or "max" (max is renormalised)."""
    attentions = model.encode(image, text, text_padding_mask, output_attentions=True).attentions
    stacked = torch.stack(attentions) if layer == "mean" else attentions[int(layer)][None]  # (layers, B, H, S, S)
    stacked = stacked.mean(dim=0)  # (B, H, S, S)
    if head == "mean":
        return stacked.mean(dim=1)
    if head == "max":
        peak = stacked.max(dim=1).values
        return peak / peak.sum(dim=-1, keepdim=True)
    return stacked[:, int(head)]


def word_to_patches(attention: torch.Tensor, word: int, num_patches: int) -> torch.Tensor:
    """(N,) share of word `word`'s attention that goes to each image patch (Fig. 7)."""
    return attention[1 + num_patches + word, 1 : 1 + num_patches]


def patch_to_words(attention: torch.Tensor, patch: int, num_patches: int, length: int) -> torch.Tensor:
    """(length,) share of patch `patch`'s attention that goes to each real caption word (Fig. 8)."""
    return attention[1 + patch, 1 + num_patches : 1 + num_patches + length]


def _normalise(values: np.ndarray) -> np.ndarray:
    span = values.max() - values.min()
    return (values - values.min()) / span if span > 0 else np.zeros_like(values)


def plot_word_attention(
    picture: np.ndarray, words: list[str], maps: dict[int, np.ndarray], path: str | Path, title: str = ""
) -> Path:
    """picture (H, W, 3) in [0, 1]; maps {word index: (g, g) attention}. One panel per chosen word:
    the image with the word's attention over the patches overlaid, its colour bar in attention
    shares (each panel spans its own minimum to maximum)."""
    plt = pyplot()
    height, width = picture.shape[:2]
    fig, axes = plt.subplots(1, 1 + len(maps), figsize=(2.6 * (1 + len(maps)), 3.0), squeeze=False)
    axes[0, 0].imshow(picture)
    axes[0, 0].set_title("image", fontsize=9)
    for ax, (index, grid) in zip(axes[0, 1:], maps.items()):
        ax.imshow(picture)
        overlay = ax.imshow(grid, cmap="jet", alpha=0.5, extent=(0, width, height, 0), interpolation="bilinear",
                            vmin=float(np.min(grid)), vmax=float(np.max(grid)))
        bar = fig.colorbar(overlay, ax=ax, fraction=0.046, pad=0.03)
        bar.solids.set_alpha(1.0)
        bar.ax.tick_params(labelsize=7)
        ax.set_title(f"“{words[index]}”", fontsize=9)
    for ax in axes[0]:
        ax.axis("off")
    fig.suptitle(title or "word → image patches", fontsize=10)
    return save_figure(fig, path)


def plot_patch_attention(
    picture: np.ndarray, words: list[str], patch: int, grid_size: int, weights: np.ndarray, path: str | Path,
    title: str = "",
) -> Path:
    """The image with the chosen patch outlined, and the caption with each word shaded by the
    patch's attention to it (Fig. 8), with a colour bar in attention shares."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import ListedColormap, Normalize
    from matplotlib.patches import Rectangle

    plt = pyplot()

    height, width = picture.shape[:2]
    ph, pw = height / grid_size, width / grid_size
    row, col = divmod(patch, grid_size)
    fig, (ax_image, ax_text) = plt.subplots(1, 2, figsize=(8.0, 3.0), gridspec_kw={"width_ratios": [1, 2]})
    ax_image.imshow(picture)
    # imshow's pixel edges are at -0.5 + k; not clipped at the axes, so that a patch on the image's
    # right or bottom border keeps its whole outline
    ax_image.add_patch(Rectangle((col * pw - 0.5, row * ph - 0.5), pw, ph, fill=False, edgecolor="red", linewidth=2,
                                 clip_on=False))
    ax_image.axis("off")
    weights = np.asarray(weights, dtype=np.float64)
    shades = _normalise(weights)
    cmap = ListedColormap(plt.get_cmap("Reds")(np.linspace(0.15, 1.0, 256)))  # the palest shade stays visible
    bar = fig.colorbar(ScalarMappable(Normalize(float(weights.min()), float(weights.max())), cmap), ax=ax_text,
                       orientation="horizontal", fraction=0.08, pad=0.02)
    bar.ax.tick_params(labelsize=7)
    bar.set_label("attention share", fontsize=8)
    x, y = 0.0, 0.8
    for word, shade in zip(words, shades):
        text = ax_text.text(x, y, word, fontsize=11, transform=ax_text.transAxes, color="white" if shade > 0.6 else "black",
                            bbox=dict(facecolor=cmap(shade), edgecolor="none", pad=2))
        fig.canvas.draw()
        extent = text.get_window_extent().transformed(ax_text.transAxes.inverted())
        x = extent.x1 + 0.02
        if x > 0.9:
            x, y = 0.0, y - 0.15
    ax_text.axis("off")
    fig.suptitle(title or "image patch → words", fontsize=10)
    return save_figure(fig, path)
