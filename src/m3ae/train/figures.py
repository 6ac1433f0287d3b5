"""Figures written during a run: loss curves, and reconstructions of a fixed batch with fixed masks
(original, masked input, reconstruction, reconstruction pasted into the visible patches) with the
captions' masked words and the model's top guesses (`m3ae.viz.reconstruction`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..utils import atomic_path
from ..viz.plotting import loss_curves_figure, save_figure
from ..viz.reconstruction import caption_predictions, plot_reconstructions, reconstruct_images
from ..engine.metrics import read_metrics


def plot_loss_curves(metrics_path: Path, out_path: Path) -> Path | None:
    fig = loss_curves_figure(read_metrics(metrics_path))
    return save_figure(fig, out_path) if fig is not None else None


def _token_names(config) -> Callable[[int], str]:
    """id -> token in the model's vocabulary (its compact one, if any); the id itself when the
    recorded (or default) tokenizer is not the model's."""
    from ..data.tokenizer import Tokenizer

    tokenizer = Tokenizer.for_model(config)
    return tokenizer.id_to_token if tokenizer.vocab_size == config.vocab_size else str


@torch.no_grad()
def reconstruction_figures(model, bare_model, batch: dict[str, torch.Tensor], noise: dict[str, torch.Tensor],
                           out_dir: Path, step: int, is_main: bool, normalization: tuple[Sequence[float], Sequence[float]] | None = None,
                           max_images: int = 8) -> list[Path]:
    """Runs `model` (possibly wrapped: every rank calls this under FSDP) on `batch` with the given
    masking noise in eval mode and, on the main process, writes `recon_<step>.png` and
    `captions_<step>.txt`. `normalization` (mean, std) undoes the input normalisation for display."""
    was_training = model.training
    model.eval()
    try:
        text = batch.get("text") if "text_noise" in noise else None
        out = model(image=batch["image"], text=text,
                    text_padding_mask=batch.get("text_padding_mask") if text is not None else None, **noise)
    finally:
        model.train(was_training)
    if not is_main:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    n = min(max_images, batch["image"].shape[0])
    image = batch["image"][:n].float().cpu()
    out = type(out)(**{k: v[:n].float().cpu() if isinstance(v, torch.Tensor) and v.ndim > 0 else v
                       for k, v in vars(out).items()})
    predictions = None
    if out.text_logits is not None:
        pad = batch.get("text_padding_mask")
        pad = torch.zeros_like(text[:n], dtype=torch.bool) if pad is None else pad[:n]
        predictions = caption_predictions(text[:n].cpu(), pad.cpu(), out, _token_names(bare_model.config))
    mean, std = normalization if normalization else (None, None)
    written = [plot_reconstructions(reconstruct_images(bare_model, image, out), out_dir / f"recon_{step:08d}.png",
                                    mean, std, title=f"step {step}")]
    if predictions is not None:
        with atomic_path(out_dir / f"captions_{step:08d}.txt") as tmp:
            tmp.write_text("\n\n".join(f"sample {i}: {p.render()}" for i, p in enumerate(predictions)) + "\n")
        written.append(out_dir / f"captions_{step:08d}.txt")
    return written
