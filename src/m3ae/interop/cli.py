"""`m3ae convert-official`: an official trainer pickle (or npz of flax paths) -> a from_pretrained directory."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from typing import Literal

MODEL_HELP = "a model directory, a checkpoint step directory, a run directory or a Hub repo id"


@dataclass
class ConvertConfig:
    checkpoint: str  # official .pkl checkpoint, or .npz / pickled dict of flax parameter paths
    out_dir: str  # directory to write config.json + model.safetensors
    num_heads: int | None = None  # encoder heads, when the checkpoint cannot tell
    dec_num_heads: int | None = None  # decoder heads, when the checkpoint cannot tell
    image_size: int | None = None  # image size the model will be used at; null: the checkpoint's
    text_length: int | None = None  # caption length (tokens); null: the checkpoint's


@dataclass
class ExportConfig:
    checkpoint: str  # a model directory, a checkpoint step directory, a run directory or a Hub repo id
    out_dir: str  # directory to write the exported encoder to
    format: Literal["hf", "timm"] = "hf"  # Hugging Face ViTModel directory, or a timm ViT state dict
    # Pixel statistics written to the HF image processor / timm config: a preset (cc12m, imagenet,
    # none); null: the ones the model's config.json records (cc12m when it records none)
    normalization: str | None = None


@dataclass
class PushConfig:
    checkpoint: str  # a model directory, a checkpoint step directory or a run directory
    repo_id: str  # the Hub repository: owner/name
    # linear-probe or finetune run directories whose results.json go into the model card
    probe: list[str] = field(default_factory=list)
    private: bool = False  # create the repository private
    branch: str | None = None  # upload to this branch; null: the default branch
    create_pr: bool = False  # open a pull request instead of committing
    token: str | None = None  # Hub token; null: the one huggingface_hub has stored


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..config import add_config_arguments

    for name, cls, func, help_text, description in (
        ("convert-official", ConvertConfig, run, "convert an official JAX M3AE/MAE checkpoint to a from_pretrained "
         "directory", "Reads the checkpoint without jax/flax and without executing code from the file."),
        ("export", ExportConfig, run_export, "export the image encoder to Hugging Face ViTModel or a timm ViT state "
         "dict", "The exported encoder computes the unmasked image-only representation of M3AE.encode."),
        ("push-to-hub", PushConfig, run_push, "upload a model (config.json, model.safetensors, model card) to the "
         "Hugging Face Hub", "The model card states the pretraining run's config and length (found beside a "
         "checkpoint) and the results of the probe runs given with --probe."),
    ):
        parser = subparsers.add_parser(name, help=help_text, description=description)
        add_config_arguments(parser, cls)
        parser.set_defaults(func=func, config_cls=cls)


def run_export(args: argparse.Namespace) -> int:
    from ..config import command_config
    from ..model import M3AE
    from .export import export

    cfg = command_config(args, ExportConfig)
    if cfg is None:
        return 0
    export(M3AE.from_pretrained(cfg.checkpoint), cfg.out_dir, cfg.format, cfg.normalization)
    print(f"wrote the {cfg.format} image encoder to {cfg.out_dir}")
    return 0


def run_push(args: argparse.Namespace) -> int:
    from ..config import command_config
    from ..model import M3AE
    from ..model.files import resolve
    from .hub import card_info_from_runs

    cfg = command_config(args, PushConfig)
    if cfg is None:
        return 0
    directory = resolve(cfg.checkpoint)
    model = M3AE.from_pretrained(directory)
    result = model.push_to_hub(cfg.repo_id, card_info=card_info_from_runs(directory, cfg.probe),
                               private=cfg.private or None, token=cfg.token, branch=cfg.branch,
                               create_pr=cfg.create_pr)
    print(f"pushed {directory} to {cfg.repo_id}: {result}")
    return 0


def run(args: argparse.Namespace) -> int:
    from ..config import command_config
    from .official import convert_official

    cfg = command_config(args, ConvertConfig)
    if cfg is None:
        return 0
    model = convert_official(cfg.checkpoint, num_heads=cfg.num_heads, dec_num_heads=cfg.dec_num_heads,
                             image_size=cfg.image_size, text_length=cfg.text_length)
    model.save_pretrained(cfg.out_dir)
    n_params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"out_dir": str(cfg.out_dir), "parameters": n_params, "config": model.config.to_dict()}, indent=2))
    return 0
