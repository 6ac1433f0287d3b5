"""Reconstructions the way the paper's Fig. 1 shows them: original, masked input, reconstruction, and
the reconstruction pasted into the visible patches; captions with masked words and top-k guesses.

Honesty rules: the pasted view shows the input's own pixels wherever a patch was visible, so only
hidden patches are the model's. A `norm_pix_loss` model predicts each patch normalised by its own
(unknown) statistics; we un-normalise hidden patches with the statistics of the visible pixels only,
never of the hidden ones, and say so on the figure.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..model import M3AE, M3AEOutput
from .plotting import pyplot, save_figure


@dataclass
class ImageReconstruction:
    original: torch.Tensor  # (B, 3, H, W), model input space
    masked: torch.Tensor  # removed patches set to the visible pixels' mean
    reconstruction: torch.Tensor  # every patch as the model predicts it
    pasted: torch.Tensor  # visible patches from the input, removed ones from the model
    image_mask: torch.Tensor  # (B, N), 1 = removed
    norm_pix: bool


@torch.no_grad()
def reconstruct_images(model: M3AE, image: torch.Tensor, out: M3AEOutput) -> ImageReconstruction:
    image = image.float()
    target = model.patchify(image)  # (B, N, P)
    pred = out.image_pred.float()
    removed = out.image_mask.float()[..., None]  # (B, N, 1)
    visible = 1.0 - removed
    count = (visible.sum(dim=(1, 2)) * target.shape[-1]).clamp_min(1.0)[:, None, None]
    visible_mean = (target * visible).sum(dim=(1, 2), keepdim=True) / count  # (B, 1, 1)
    if model.config.norm_pix_loss:
        visible_var = (((target - visible_mean) * visible) ** 2).sum(dim=(1, 2), keepdim=True) / count
        pred = pred * (visible_var + 1e-6).sqrt() + visible_mean
    return ImageReconstruction(
        original=image,
        masked=model.unpatchify(target * visible + visible_mean * removed),
        reconstruction=model.unpatchify(pred),
        pasted=model.unpatchify(target * visible + pred * removed),
        image_mask=out.image_mask,
        norm_pix=model.config.norm_pix_loss,
    )


@dataclass
class CaptionPrediction:
    words: list[str]  # the caption's real tokens
    removed: list[bool]  # which of them were masked
    guesses: list[list[str]]  # top-k guesses for each masked word (empty for visible words)

    def render(self, max_guesses: int | None = None) -> str:
        """The caption with its masked words in brackets, then the guesses for each masked word (the
        first `max_guesses` of them, where a figure has room for no more)."""
        shown = [f"[{w}]" if r else w for w, r in zip(self.words, self.removed)]
        guessed = [f"  {w!r} -> {', '.join(g)}" for w, r, g in zip(self.words, self.removed, self.guesses) if r]
        if max_guesses is not None and len(guessed) > max_guesses:
            guessed = guessed[:max_guesses] + [f"  … and {len(guessed) - max_guesses} more masked words"]
        return "\n".join([" ".join(shown), *guessed])


@torch.no_grad()
def caption_predictions(
    text: torch.Tensor, text_padding_mask: torch.Tensor, out: M3AEOutput, decode: Callable[[int], str], top_k: int = 3
) -> list[CaptionPrediction]:
    """Needs `out.text_logits` (run the model with compute_logits=True)."""
    if out.text_logits is None:
        raise ValueError("caption predictions need text logits: call the model with compute_logits=True")
    guesses = out.text_logits.float().topk(top_k, dim=-1).indices.cpu()
    text, pad, removed = text.cpu(), text_padding_mask.bool().cpu(), out.text_mask.bool().cpu()
    predictions = []
    for i in range(text.shape[0]):
        real = (~pad[i]).nonzero().flatten().tolist()
        predictions.append(CaptionPrediction(
            words=[decode(int(text[i, p])) for p in real],
            removed=[bool(removed[i, p]) for p in real],
            guesses=[[decode(int(g)) for g in guesses[i, p]] if removed[i, p] else [] for p in real],
        ))
    return predictions


def to_display(
    images: torch.Tensor, mean: Sequence[float] | None, std: Sequence[float] | None,
    reference: torch.Tensor | None = None,
) -> torch.Tensor:
    """Model-space images -> (B, H, W, 3) in [0, 1], undoing the input normalisation when known, else
    stretching each image by the range of its `reference` (default: itself)."""
    images = images.detach().float().cpu()
    if mean is not None and std is not None:
        images = images * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    else:
        reference = images if reference is None else reference.detach().float().cpu()
        lo = reference.amin(dim=(1, 2, 3), keepdim=True)
        hi = reference.amax(dim=(1, 2, 3), keepdim=True)
        images = (images - lo) / (hi - lo).clamp_min(1e-6)
    return images.clamp(0, 1).permute(0, 2, 3, 1)


def plot_reconstructions(
    rec: ImageReconstruction,
    path: str | Path,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    captions: list[CaptionPrediction] | None = None,
    title: str = "",
) -> Path:
    """One row per sample: original, masked input, reconstruction, reconstruction pasted into the
    visible patches, and (when given) the caption with the model's guesses for its masked words."""
    plt = pyplot()
    views = [to_display(v, mean, std, reference=rec.original)
             for v in (rec.original, rec.masked, rec.reconstruction, rec.pasted)]
    names = ["original", "masked input", "reconstruction", "visible + reconstruction"]
    rows, columns = views[0].shape[0], 4 + (1 if captions else 0)
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * 4 + (4.4 if captions else 0), 2.2 * rows), squeeze=False,
                             gridspec_kw={"width_ratios": [1] * 4 + ([2] if captions else [])})
    for row in range(rows):
        for col in range(4):
            ax = axes[row][col]
            ax.imshow(views[col][row].numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(names[col], fontsize=9)
        if captions:
            ax = axes[row][4]
            ax.axis("off")
            # a row is 2.2 inches: room for the wrapped caption and about eight guess lines at 8 pt
            ax.text(0.0, 0.95, captions[row].render(max_guesses=8), fontsize=8, va="top", family="monospace", wrap=True,
                    transform=ax.transAxes)
            if row == 0:
                ax.set_title("caption: [masked] -> top guesses", fontsize=9)
    note = ("norm-pix model: hidden patches un-normalised with the visible pixels' mean and std"
            if rec.norm_pix else "pixel target")
    fig.suptitle(f"{title}  ({note})" if title else note, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, dpi=80)
