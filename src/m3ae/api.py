"""open_clip's entry points: a model with the image transforms and the tokenizer it was trained with,
from one name.

    model, train_transform, eval_transform = m3ae.create_model_and_transforms("runs/exp1")
    tokenizer = m3ae.get_tokenizer("runs/exp1")
    image = eval_transform(PIL.Image.open("cat.jpg"))[None]      # (1, 3, H, W), normalised
    text, padding = tokenizer(["a photo of a cat"])               # (1, L) ids and padding mask
    features = model.encode(image, text, padding).cls

A name is anything `M3AE.from_pretrained` loads (a model, checkpoint or run directory, a Hub repo id)
or a preset (`tiny`, `small`, `base`, `large`, `huge`: randomly initialised). The preprocessing comes
from config.json's "preprocessing" record (written by `m3ae pretrain` since it exists); a model
without one gets the pipeline's defaults, with a warning.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from .data.config import DataConfig
from .data.tokenizer import Tokenizer
from .data.transforms import ImageTransform, normalize_batch, to_rgb
from .model import PRESETS, M3AE, M3AEConfig
from .model.config import PREPROCESSING_KEY
from .model.files import CONFIG_NAME, resolve


class ImagePreprocess:
    """A PIL image (any mode) to a normalised float32 (3, H, W) tensor, or a list of them to
    (B, 3, H, W): evaluation (resize the shorter side, centre crop) or training (random resized
    crop + flip, from its own generator). The same pixels as the data pipeline's."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float], train: bool = False,
                 crop_scale: Sequence[float] = (0.2, 1.0), horizontal_flip: bool = True, seed: int | None = None) -> None:
        self.transform = ImageTransform(size, train=train, scale=tuple(crop_scale), flip=horizontal_flip)
        self.mean, self.std = tuple(mean), tuple(std)
        self.rng = np.random.default_rng(seed) if train else None

    def __call__(self, image: Image.Image | Sequence[Image.Image]) -> torch.Tensor:
        images = [image] if isinstance(image, Image.Image) else list(image)
        pixels = np.stack([self.transform(to_rgb(im), self.rng) for im in images])
        batch = normalize_batch(pixels, self.mean, self.std)
        return batch[0] if isinstance(image, Image.Image) else batch

    def __repr__(self) -> str:
        t = self.transform
        kind = f"train, crop scale {t.scale}, flip {t.flip}" if t.train else "eval, resize + centre crop"
        return f"ImagePreprocess({t.size} px, {kind}, mean {self.mean}, std {self.std})"


def _config_and_preprocessing(name_or_path: str | Path, weights: bool,
                              **load: Any) -> tuple[M3AE | None, M3AEConfig, dict]:
    """(the model when `weights`, its config, its preprocessing record completed with the defaults)."""
    model = None
    if str(name_or_path) in PRESETS and not Path(name_or_path).exists():
        config, recorded = M3AEConfig.from_preset(str(name_or_path)), None
    elif weights:
        model = M3AE.from_pretrained(name_or_path, **load)
        config, recorded = model.config, model.preprocessing
    else:  # config.json alone (a transfer checkpoint's model is its `backbone`)
        path = resolve(name_or_path, **load) / CONFIG_NAME
        stored = json.loads(path.read_text())
        config = M3AEConfig.from_dict(stored["backbone"]) if "backbone" in stored else M3AEConfig.load(path)
        recorded = stored.get(PREPROCESSING_KEY)
    if not isinstance(recorded, dict):
        recorded = DataConfig().preprocessing()
        if str(name_or_path) not in PRESETS:
            warnings.warn(f"{name_or_path}: config.json records no preprocessing (written before it did): using "
                          f"the defaults, the cc12m pixel statistics",
                          stacklevel=3)
    return model, config, {**DataConfig().preprocessing(), **recorded}


def create_model_and_transforms(name_or_path: str | Path, *, seed: int | None = None,
                                **load: Any) -> tuple[M3AE, ImagePreprocess, ImagePreprocess]:
    """(model in eval mode, training transform, evaluation transform). `seed` seeds the training
    transform's crops and flips; `load` goes to `M3AE.from_pretrained` (revision, cache_dir, ...)."""
    model, config, pre = _config_and_preprocessing(name_or_path, True, **load)
    if model is None:
        model = M3AE(config)
        model.preprocessing = pre
    stats = dict(size=config.image_size, mean=pre["image_mean"], std=pre["image_std"])
    train = ImagePreprocess(**stats, train=True, crop_scale=pre["crop_scale"], horizontal_flip=pre["horizontal_flip"],
                            seed=seed)
    return model.eval(), train, ImagePreprocess(**stats)


def get_tokenizer(name_or_path: str | Path, **load: Any) -> Tokenizer:
    """The tokenizer the model was trained with, at its caption length and in its ids (its compact
    vocabulary, if it has one): `tokenizer(texts)` gives (ids, padding mask), the `text` and `text_padding_mask` of `M3AE.encode`. Reads config.json
    only; `load` goes to the name's resolution (revision, cache_dir, ...)."""
    _, config, pre = _config_and_preprocessing(name_or_path, False, **load)
    # the model's field; a config.json written before it was recorded once may hold it in the record
    return Tokenizer.for_model(config, None if config.tokenizer else pre.get("tokenizer"))
