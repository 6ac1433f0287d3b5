"""Loading a checkpoint's inputs for the figure commands: images from files, captions tokenised."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..model import M3AE


def normalization_stats(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of a normalisation preset, validated as the data pipeline does."""
    from ..data.config import DataConfig

    return DataConfig(normalization=name).normalization_stats()


def load_images(paths: list[str], size: int, normalization: str) -> tuple[torch.Tensor, np.ndarray]:
    """Files -> (model input (B, 3, size, size), display pixels (B, size, size, 3) in [0, 1]),
    with the evaluation transform (Resize + CenterCrop)."""
    from ..data.transforms import ImageTransform, SkipSample, decode_image, normalize_batch

    transform = ImageTransform(size, train=False)
    pixels = []
    for path in paths:
        try:
            image = decode_image(Path(path).read_bytes(), max_pixels=1 << 28, min_side=1)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such image") from None
        except SkipSample as error:
            raise ValueError(f"{path}: cannot be used ({error})") from None
        pixels.append(transform(image))
    batch = np.stack(pixels)
    mean, std = normalization_stats(normalization)
    return normalize_batch(batch, mean, std), batch.astype(np.float32) / 255.0


def tokenize(model: M3AE, captions: list[str], tokenizer_name: str | None = None):
    """Captions -> (ids, padding mask, tokenizer) in the model's ids (its compact vocabulary, if it has
    one). `tokenizer_name` None: the tokenizer the model records, else bert-base-uncased."""
    from ..data.tokenizer import Tokenizer

    tokenizer = Tokenizer.for_model(model.config, tokenizer_name)
    if tokenizer.vocab_size != model.config.vocab_size:
        raise ValueError(f"tokenizer {tokenizer.name!r} has {tokenizer.vocab_size} tokens but the model "
                         f"{model.config.vocab_size}: pass --tokenizer")
    ids, pad = tokenizer(captions)
    return ids, pad, tokenizer
