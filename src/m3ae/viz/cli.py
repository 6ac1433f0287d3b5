"""Figure commands: reconstruct (Fig. 1), attention (Figs. 7-8), tsne (Fig. 9), report."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


from dataclasses import dataclass, field
from typing import Literal

from ..data import DataConfig
from ..engine.runtime import ThreadsSetting

MODEL_HELP = "a model directory, a checkpoint step directory, a run directory or a Hub repo id"


@dataclass
class FigureConfig:
    checkpoint: str  # a model directory, a checkpoint step directory, a run directory or a Hub repo id
    normalization: str | None = None  # input normalisation preset; null: the checkpoint run's, else cc12m
    # tokenizer name or tokenizer.json path; null: the one the model records, else bert-base-uncased
    tokenizer: str | None = None
    seed: int = 0  # masking noise seed
    threads: ThreadsSetting = "auto"  # CPU threads; auto: the free physical cores


# kw_only: a required field may follow the base's defaulted ones
@dataclass(kw_only=True)
class ReconstructConfig(FigureConfig):
    image: list[str] = field(metadata={"aliases": ("--images",)})  # image files, one row each
    # one per image; null: image-only
    caption: list[str] | None = field(default=None, metadata={"aliases": ("--captions",)})
    out: str = "reconstruction.png"  # output figure
    image_mask_ratio: float | None = None  # fraction of patches hidden; null: the model's
    text_mask_ratio: float | None = None  # fraction of words hidden; null: the model's
    top_k: int = 3  # guesses shown per masked word


@dataclass(kw_only=True)
class AttentionConfig(FigureConfig):
    image: str  # the image file
    caption: str  # its caption
    words: list[str] | None = None  # words to map over the image; null: up to 5 of the caption's
    # ROW,COL of the patch whose attention over the words is shown; null: the patch the first word
    # attends to most
    patch: str | None = None
    layer: int | Literal["mean"] = -1  # a layer index, or the mean over layers
    head: int | Literal["mean", "max"] = "mean"  # a head index, or the mean or max over heads
    # writes OUT_words.png and OUT_patch.png
    out: str = field(default="attention", metadata={"aliases": ("--out-prefix",)})


@dataclass
class TsneConfig:
    # The models to embed, NAME=MODEL or MODEL (named after its directory), one panel each:
    # --checkpoint M3AE=runs/a MAE=runs/b
    checkpoint: list[str]
    data: DataConfig = field(default_factory=DataConfig)  # the labelled source; image_size follows the model
    # all: every sample of --data.source; train or val: that evaluation split (--train-data,
    # --val-data, --val-fraction; val is refused when it repeats train), as in `m3ae embed`
    split: Literal["all", "train", "val"] = "all"
    max_samples: int = 1000  # samples per panel
    batch_size: int = 128  # images per forward pass
    out: str = "tsne.png"  # output figure
    seed: int = 0  # t-SNE seed
    threads: ThreadsSetting = "auto"  # CPU threads; auto: the free physical cores


@dataclass
class ReportConfig:
    run_dir: str  # the run directory to report on
    out: str | None = None  # output path; null: RUN_DIR/report.html


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..config import add_config_arguments

    for name, cls, func, help_text in (
        ("reconstruct", ReconstructConfig, run_reconstruct, "reconstructions of given images and captions "
         "(paper Fig. 1)"),
        ("attention", AttentionConfig, run_attention, "word->patch and patch->word attention maps (paper Figs. 7-8)"),
        ("tsne", TsneConfig, run_tsne, "t-SNE of image features coloured by label, one panel per model (Fig. 9)"),
        ("report", ReportConfig, run_report, "one self-contained HTML page for a run directory"),
    ):
        parser = subparsers.add_parser(name, help=help_text, description=help_text)
        add_config_arguments(parser, cls)
        parser.set_defaults(func=func, config_cls=cls)


def _config(args: argparse.Namespace):
    """The command's config with threads applied; None after --print-config."""
    import sys

    from ..config import command_config
    from ..engine.runtime import apply_threads

    cfg = command_config(args, args.config_cls)
    if cfg is not None and hasattr(cfg, "threads"):
        print(apply_threads(cfg.threads).describe(), file=sys.stderr)
    return cfg


def checkpoint_normalization(model_dir: str) -> str:
    """The input normalisation the model was trained with: the `data.normalization` of its run's
    config.yaml when given a run directory or a checkpoint in one, else cc12m (e.g. a Hub repo id)."""
    from ..engine.run_dir import RunDir

    run = RunDir.containing(model_dir)
    data = (run.read_config().get("data") or {}) if run is not None else {}
    return str(data.get("normalization", "cc12m"))


def _load(cfg: FigureConfig, **overrides):
    from ..model import M3AE

    model = M3AE.from_pretrained(cfg.checkpoint, **{k: v for k, v in overrides.items() if v is not None}).eval()
    return model, cfg.normalization or checkpoint_normalization(cfg.checkpoint)


def run_reconstruct(args: argparse.Namespace) -> int:
    import torch

    from ..config import ConfigError
    from .inputs import load_images, normalization_stats, tokenize
    from .reconstruction import caption_predictions, plot_reconstructions, reconstruct_images

    cfg = _config(args)
    if cfg is None:
        return 0
    if cfg.caption is not None and len(cfg.caption) != len(cfg.image):
        raise ConfigError(f"--caption: {len(cfg.caption)} given for {len(cfg.image)} images")
    model, normalization = _load(cfg, image_mask_ratio=cfg.image_mask_ratio, text_mask_ratio=cfg.text_mask_ratio)
    image, _ = load_images(cfg.image, model.config.image_size, normalization)
    torch.manual_seed(cfg.seed)
    with torch.no_grad():
        if cfg.caption and model.config.has_text:
            text, pad, tokenizer = tokenize(model, cfg.caption, cfg.tokenizer)
            out = model(image, text, pad)
            predictions = caption_predictions(text, pad, out, tokenizer.id_to_token, cfg.top_k)
        else:
            out, predictions = model(image), None
    mean, std = normalization_stats(normalization)
    path = plot_reconstructions(reconstruct_images(model, image, out), cfg.out, mean, std, predictions,
                                title=f"{Path(cfg.checkpoint).name}: image mask {model.config.image_mask_ratio:.0%}")
    for prediction in predictions or []:
        print(prediction.render())
    print(f"wrote {path}")
    return 0


def _word_positions(tokens: list[str], wanted: list[str] | None) -> list[int]:
    from ..config import ConfigError

    if not wanted:
        return list(range(min(5, len(tokens))))
    positions = []
    for word in wanted:
        if word.lower() not in tokens:
            raise ConfigError(f"--words: {word!r} is not a token of the caption {tokens}")
        positions.append(tokens.index(word.lower()))
    return positions


def _patch_index(patch: str, grid: int) -> int:
    from ..config import ConfigError

    try:
        row, col = (int(v) for v in patch.split(","))
    except ValueError:
        raise ConfigError(f"--patch {patch!r}: expected ROW,COL") from None
    if not (0 <= row < grid and 0 <= col < grid):
        raise ConfigError(f"--patch {patch!r}: the patch grid is {grid}x{grid}")
    return row * grid + col


def run_attention(args: argparse.Namespace) -> int:
    from ..config import ConfigError
    from .attention import attention_matrix, patch_to_words, plot_patch_attention, plot_word_attention, word_to_patches
    from .inputs import load_images, tokenize

    cfg = _config(args)
    if cfg is None:
        return 0
    model, normalization = _load(cfg)
    if not model.config.has_text:
        raise ConfigError(f"--checkpoint {cfg.checkpoint}: an image-only model has no word-image attention")
    image, picture = load_images([cfg.image], model.config.image_size, normalization)
    text, pad, tokenizer = tokenize(model, [cfg.caption], cfg.tokenizer)
    length = int((~pad[0]).sum())
    tokens = [tokenizer.id_to_token(int(i)) for i in text[0, :length]]
    attention = attention_matrix(model, image, text, pad, layer=cfg.layer, head=cfg.head)[0]
    N, g = model.config.num_patches, model.config.grid_size
    words = _word_positions(tokens, cfg.words)
    maps = {w: word_to_patches(attention, w, N).reshape(g, g).numpy() for w in words}
    patch = _patch_index(cfg.patch, g) if cfg.patch else int(word_to_patches(attention, words[0], N).argmax())
    where = f"layer {cfg.layer}, head {cfg.head}"
    first = plot_word_attention(picture[0], tokens, maps, f"{cfg.out}_words.png", f"word → image patches ({where})")
    second = plot_patch_attention(picture[0], tokens, patch, g, patch_to_words(attention, patch, N, length).numpy(),
                                  f"{cfg.out}_patch.png", f"image patch {divmod(patch, g)} → words ({where})")
    print(f"wrote {first} and {second}")
    return 0


def run_tsne(args: argparse.Namespace) -> int:
    import itertools
    import math

    from ..data import build_eval_loader
    from ..data.factory import label_names
    from ..eval import api
    from ..model import M3AE
    from .tsne import plot_tsne

    cfg = _config(args)
    if cfg is None:
        return 0
    panels, read = {}, ""
    for spec in cfg.checkpoint:
        name, sep, directory = spec.rpartition("=")
        name = name if sep else Path(directory).name
        model = M3AE.from_pretrained(directory)
        data = api.data_for_model(cfg.data, model.config, model_field=f"the image_size of {directory}")
        read = read or api.embedded_split(data, cfg.split)
        batches = itertools.islice(build_eval_loader(data, batch_size=cfg.batch_size, split=cfg.split),
                                   math.ceil(cfg.max_samples / cfg.batch_size))
        out = api.features(model, batches, ("cls",))["cls"]
        panels[name] = (out["features"][: cfg.max_samples].numpy(), out["labels"][: cfg.max_samples].numpy())
    class_names = label_names(cfg.data.source, split=cfg.split)
    print(f"t-SNE of up to {cfg.max_samples} images per panel, {read}")
    print(f"wrote {plot_tsne(panels, cfg.out, class_names, seed=cfg.seed)}")
    print(json.dumps({name: int(len(labels)) for name, (_, labels) in panels.items()}))
    return 0


def run_report(args: argparse.Namespace) -> int:
    from .report import build_report

    cfg = _config(args)
    if cfg is None:
        return 0
    print(f"report: {build_report(cfg.run_dir, cfg.out)}")
    return 0
