"""Does the model look at the picture when it fills in masked words?

Masked-word accuracy is measured twice on the same pairs with the same masks: once with each
caption's own image, once with the image of another sample in the batch. The difference is the
part of the text predictions that comes from the pixels. A gap near zero means the text decoder
has learned a language model of the captions and nothing that ties words to image regions; the
text loss then cannot shape the image features, which is what the linear probe measures. Words
can be counted in several sets at once (e.g. all of them, and the class names alone)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

from ..model import M3AE
from ..engine.runtime import PrecisionSetting, resolve_precision


@torch.no_grad()
def grounding_accuracy(model: M3AE, batches: Iterable[dict], device: torch.device,
                       precision: PrecisionSetting = "fp32",
                       word_sets: Mapping[str, Sequence[int] | None] | None = None,
                       seed: int = 0) -> dict[str, dict[str, float]]:
    """For each word set (None: every word; default {"all_words": None}): top-1 accuracy (%) over
    the removed caption words of that set with the pair's own image ("matched") and with the next
    sample's image ("mismatched"), "gap" = matched - mismatched, and "words" counted. Masks follow
    the model's ratios, drawn from `seed`, identical in both passes."""
    if model.config.model_type != "m3ae":
        raise ValueError("grounding_accuracy: needs an M3AE model (an MAE model has no text decoder)")
    model.eval().to(device)
    autocast = resolve_precision(precision, device).autocast
    generator = torch.Generator().manual_seed(seed)
    word_sets = {"all_words": None} if word_sets is None else word_sets
    wanted = {name: None if ids is None else torch.tensor(sorted(set(ids)), device=device)
              for name, ids in word_sets.items()}
    hits = {name: {"matched": 0, "mismatched": 0} for name in wanted}
    words = dict.fromkeys(wanted, 0)
    for batch in batches:
        if "text" not in batch:
            raise ValueError("grounding_accuracy: the batches hold no captions (use a source of image-text pairs)")
        image, text = batch["image"].to(device), batch["text"].to(device)
        padding = batch["text_padding_mask"].to(device).bool()
        B = image.shape[0]
        if B < 2:  # no other image to swap in
            continue
        noise = dict(image_noise=torch.rand(B, model.config.num_patches, generator=generator).to(device),
                     text_noise=torch.rand(B, text.shape[1], generator=generator).to(device))
        # the next sample's image: a different picture with the same image statistics
        for pass_name, pixels in (("matched", image), ("mismatched", image.roll(1, dims=0))):
            with autocast():
                out = model(pixels, text, padding, compute_logits=True, **noise)
            correct = out.text_logits.argmax(-1) == text
            removed = out.text_mask.bool() & ~padding
            for name, ids in wanted.items():
                counted = removed if ids is None else removed & torch.isin(text, ids)
                hits[name][pass_name] += int((correct & counted).sum())
                if pass_name == "matched":
                    words[name] += int(counted.sum())
    result = {}
    for name, count in words.items():
        if count == 0:
            raise ValueError(f"grounding_accuracy: no removed word of set {name!r} to score")
        accuracy = {p: 100.0 * h / count for p, h in hits[name].items()}
        result[name] = {**accuracy, "gap": accuracy["matched"] - accuracy["mismatched"], "words": float(count)}
    return result
