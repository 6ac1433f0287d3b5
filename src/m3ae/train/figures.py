"""Figures of a run: loss curves from metrics.jsonl, and reconstructions — image grids (original,
masked input, reconstruction, reconstruction pasted into the visible patches) and caption
predictions (each masked word with the model's top guesses)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ..utils import atomic_path
from ..viz.plotting import pyplot, save_figure
from .metrics import read_metrics

VOCAB_ASSET = "assets/bert-base-uncased-vocab.txt"


def plot_loss_curves(metrics_path: Path, out_path: Path) -> Path | None:
    records = read_metrics(metrics_path)
    keys = [k for k in ("loss", "image_loss", "text_loss", "unpaired_text_loss") if any(k in r for r in records)]
    if not records or not keys:
        return None
    fig, axes = pyplot().subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        points = [(r["step"], r[key]) for r in records if key in r]
        ax.plot(*zip(*points))
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.set_yscale("log")
    fig.tight_layout()
    return save_figure(fig, out_path, dpi=100)


def _vocabulary(vocab_size: int) -> list[str] | None:
    words = resources.files("m3ae").joinpath(VOCAB_ASSET).read_text().splitlines()
    return words if len(words) == vocab_size else None


def _display(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1], scaled by each reference image's range (inputs may be normalised)."""
    lo = reference.amin(dim=(1, 2, 3), keepdim=True)
    hi = reference.amax(dim=(1, 2, 3), keepdim=True)
    return ((images - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)


@torch.no_grad()
def reconstruction_figures(model, bare_model, batch: dict[str, torch.Tensor], noise: dict[str, torch.Tensor],
                           out_dir: Path, step: int, is_main: bool, max_images: int = 8) -> list[Path]:
    """Runs `model` (possibly wrapped: every rank calls this under FSDP) on `batch` with the given
    masking noise in eval mode and,
    on the main process, writes `recon_<step>.png` and `captions_<step>.txt`."""
    cfg = bare_model.config
    was_training = model.training
    model.eval()
    try:
        text = batch.get("text") if "text_noise" in noise else None
        out = model(image=batch["image"], text=text, text_padding_mask=batch.get("text_padding_mask") if text is not None else None,
                    **noise)
    finally:
        model.train(was_training)
    if not is_main:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [_image_grid(bare_model, batch["image"][:max_images].float().cpu(), out, out_dir / f"recon_{step:08d}.png")]
    if out.text_logits is not None:
        written.append(_captions(cfg, batch, out, out_dir / f"captions_{step:08d}.txt", max_images))
    return written


def _image_grid(bare_model, image: torch.Tensor, out: Any, path: Path) -> Path:
    n = image.shape[0]
    cfg = bare_model.config
    pred = out.image_pred[:n].float().cpu()
    target = bare_model.patchify(image)
    if cfg.norm_pix_loss:  # predictions are per-patch normalised: undo with the target's statistics
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        pred = pred * (var + 1e-6).sqrt() + mean
    removed = out.image_mask[:n].float().cpu().unsqueeze(-1)  # (n, N, 1)
    masked_input = bare_model.unpatchify(target * (1 - removed) + removed * target.mean())
    reconstruction = bare_model.unpatchify(pred)
    pasted = bare_model.unpatchify(target * (1 - removed) + pred * removed)
    columns = {"original": image, "masked input": masked_input, "reconstruction": reconstruction,
               "visible + reconstruction": pasted}
    fig, axes = pyplot().subplots(n, len(columns), figsize=(2 * len(columns), 2 * n), squeeze=False)
    for col, (title, images) in enumerate(columns.items()):
        shown = _display(images, image).permute(0, 2, 3, 1).numpy()
        for row in range(n):
            ax = axes[row][col]
            ax.imshow(shown[row])
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, dpi=80)


def _captions(cfg, batch: dict[str, torch.Tensor], out: Any, path: Path, max_samples: int, top_k: int = 3) -> Path:
    vocab = _vocabulary(cfg.vocab_size)

    def word(i: int) -> str:
        return vocab[i] if vocab else f"#{i}"

    text = batch["text"][:max_samples].cpu()
    pad = batch.get("text_padding_mask")
    pad = torch.zeros_like(text, dtype=torch.bool) if pad is None else pad[:max_samples].cpu().bool()
    removed = out.text_mask[:max_samples].cpu().bool() & ~pad
    guesses = out.text_logits[:max_samples].float().cpu().topk(top_k, dim=-1).indices
    lines = []
    for i in range(text.shape[0]):
        shown = [f"[{word(t)}]" if r else word(t) for t, r, p in zip(text[i].tolist(), removed[i].tolist(), pad[i].tolist()) if not p]
        lines.append(f"sample {i}: " + " ".join(shown))
        for pos in removed[i].nonzero().flatten().tolist():
            tops = ", ".join(word(g) for g in guesses[i, pos].tolist())
            lines.append(f"  position {pos}: {word(text[i, pos].item())!r} -> guesses {tops}")
        lines.append("")
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines))
    return path
