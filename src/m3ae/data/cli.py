"""`m3ae data {synth,build,inspect}`. The defaults are the library functions' own."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from inspect import signature

from .config import DataConfig
from .factory import build_shards
from .synth import ensure_embedded_dataset

_SYNTH = signature(ensure_embedded_dataset).parameters
_BUILD = signature(build_shards).parameters


@dataclass
class SynthConfig:
    out_dir: str = _SYNTH["root"].default  # created; left unchanged if it already holds this dataset
    seed: int = _SYNTH["seed"].default  # the generator's seed: same seed, same bytes
    train: int = _SYNTH["train"].default  # training samples
    val: int = _SYNTH["val"].default  # held-out labelled samples
    image_size: int = _SYNTH["image_size"].default  # side of the square images, in pixels
    shard_size: int = _SYNTH["shard_size"].default  # samples per .tar shard


@dataclass
class BuildConfig:
    out_dir: str  # output directory of the shards
    # The source to convert (source, format, columns; a manifest or image folder, typically)
    data: DataConfig = field(default_factory=DataConfig)
    shard_size: int = _BUILD["shard_size"].default  # samples per .tar shard
    prefix: str = _BUILD["prefix"].default  # shard file names: PREFIX-0000.tar


@dataclass
class InspectConfig:
    # The source to read (source, format, columns, tokenizer, text_length, image limits)
    data: DataConfig = field(default_factory=DataConfig)
    limit: int | None = None  # read at most this many records; null: all


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..config import add_config_arguments

    data = subparsers.add_parser("data", help="datasets: generate, convert, inspect")
    commands = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    for name, cls, func, help_text in (
        ("synth", SynthConfig, _synth, "generate the embedded procedural image-caption dataset"),
        ("build", BuildConfig, _build, "convert a manifest (JSONL/CSV), table or image folder into tar shards"),
        ("inspect", InspectConfig, _inspect, "print JSON statistics of a source"),
    ):
        parser = commands.add_parser(name, help=help_text, description=help_text)
        add_config_arguments(parser, cls)
        parser.set_defaults(func=func, config_cls=cls)


def _synth(args: argparse.Namespace) -> int:
    import time

    from ..config import command_config

    cfg = command_config(args, SynthConfig)
    if cfg is None:
        return 0
    start = time.perf_counter()
    root = ensure_embedded_dataset(cfg.out_dir, cfg.seed, cfg.train, cfg.val, cfg.image_size, cfg.shard_size)
    print(json.dumps({"root": str(root), "seconds": round(time.perf_counter() - start, 1),
                      **json.loads((root / "manifest.json").read_text())}, indent=1))
    return 0


def _build(args: argparse.Namespace) -> int:
    from ..config import command_config

    cfg = command_config(args, BuildConfig)
    if cfg is None:
        return 0
    print(json.dumps(build_shards(cfg.data.source, cfg.out_dir, cfg.data.format, cfg.shard_size, cfg.prefix,
                                  cfg.data.columns), indent=1))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from ..config import command_config
    from .inspect import inspect_source

    cfg = command_config(args, InspectConfig)
    if cfg is None:
        return 0
    data = cfg.data
    print(json.dumps(inspect_source(data.source, data.format, cfg.limit, data.tokenizer, data.text_length,
                                    data.max_image_pixels, data.min_image_size, columns=data.columns), indent=1))
    return 0
