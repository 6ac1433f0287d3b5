"""`m3ae embed`, `linear-probe`, `finetune`, `knn`, `ood` and `demo`. Heavy imports stay in handlers."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from typing import Literal

from ..data import DataConfig
from ..engine.runtime import PrecisionSetting, ThreadsSetting
from .features import Pool

MODEL_HELP = "a model directory, a checkpoint step directory, a run directory or a Hub repo id"


@dataclass
class FeatureCommandConfig:
    """What every command on frozen features takes: a model, a labelled source and how to run."""

    checkpoint: str  # a model directory, a checkpoint step directory, a run directory or a Hub repo id
    # The labelled source (image folder, .tar shards with .cls, HDF5, manifest, or "embedded") and its
    # evaluation splits; image_size and text_length follow the model.
    data: DataConfig = field(default_factory=DataConfig)
    pool: Pool = "cls"  # the image feature: the [CLS] token, or the mean of the patch tokens
    batch_size: int = 256  # images per forward pass
    precision: PrecisionSetting = "auto"  # auto: bf16 where the device computes it natively and faster
    device: str = "auto"  # auto: CUDA when available
    threads: ThreadsSetting = "auto"  # CPU threads; auto: the free physical cores


# kw_only: a required field may follow the base's defaulted ones
@dataclass(kw_only=True)
class EmbedConfig(FeatureCommandConfig):
    out: str  # output file: .safetensors or .npz
    # all: every sample of --data.source (labels where it has them); train or val: that evaluation
    # split (--train-data, --val-data, --val-fraction; val is refused when it repeats train)
    split: Literal["all", "train", "val"] = "all"
    # text and pair read captions from the pair source (--data.source), in its streaming order
    modality: Literal["image", "text", "pair"] = "image"
    layer: int | None = None  # block 1..depth (before the final norm); null: the encoder output


@dataclass
class KnnConfig(FeatureCommandConfig):
    k: int = 20  # neighbours that vote
    temperature: float = 0.07  # votes weighted by exp(cosine / temperature)


@dataclass(kw_only=True)
class OodConfig(FeatureCommandConfig):
    out_data: str  # the out-of-distribution source (its val split; labels not needed)
    out_format: str = "auto"  # the out-of-distribution source's format


def register(subparsers) -> None:
    from ..config import add_config_arguments
    from .probe import FinetuneConfig, LinearProbeConfig

    for name, cls, func, help_text in (
        ("embed", EmbedConfig, embed_command, "features of images, captions or pairs from any checkpoint "
         "(.safetensors or .npz of features, labels and keys)"),
        ("knn", KnnConfig, knn_command, "k-NN accuracy on frozen features (cosine, temperature-weighted)"),
        ("ood", OodConfig, ood_command, "out-of-distribution detection: Mahalanobis and max-softmax AUROC"),
    ):
        p = subparsers.add_parser(name, help=help_text, description=f"{help_text}. The model: --checkpoint MODEL "
                                  f"({MODEL_HELP}).")
        add_config_arguments(p, cls)
        p.set_defaults(func=func)

    for name, cls, help_text in (
        ("linear-probe", LinearProbeConfig, "linear probe of a frozen encoder (BatchNorm + Linear; SGD or LARS by batch size)"),
        ("finetune", FinetuneConfig, "full fine-tuning (layer decay, drop-path, mixup/CutMix, AdamW)"),
    ):
        p = subparsers.add_parser(name, help=help_text, description=f"{help_text}. Any config field is a "
                                  f"flag, e.g. --checkpoint RUN --data.source DIR --epochs 10.")
        add_config_arguments(p, cls)
        p.set_defaults(func=transfer_command, config_cls=cls, command_name=name)

    from .demo import register as register_demo

    register_demo(subparsers)


def _device(cfg: FeatureCommandConfig):
    from ..engine.runtime import resolve_device

    return resolve_device(cfg.device)


def _prepare(args: argparse.Namespace, cls: type):
    """The command's config and model, with threads applied and --precision auto resolved (both said
    on stderr); (None, None) after --print-config."""
    from ..config import command_config
    from ..engine.runtime import apply_threads, resolve_precision
    from ..model import M3AE

    cfg = command_config(args, cls)
    if cfg is None:
        return None, None
    print(apply_threads(cfg.threads).describe(), file=sys.stderr)
    precision = resolve_precision(cfg.precision, _device(cfg))
    print(precision.describe(), file=sys.stderr)
    cfg.precision = precision.name
    return cfg, M3AE.from_pretrained(cfg.checkpoint)


def _features(cfg: FeatureCommandConfig, model, data, split: str, labelled: bool = True) -> dict:
    from ..data import build_eval_loader
    from . import api

    # name the source this split is read from (--train-data / --val-data when given), not data.source
    given = getattr(data, f"eval_{split}_source") if not data.eval_val_fraction else None
    where = (f"data source {given!r} (--{split}-data)" if given
             else f"data source {data.source!r} ({split} split)")
    return api.features(model, build_eval_loader(data, cfg.batch_size, split=split), (cfg.pool,), device=_device(cfg),
                        precision=cfg.precision, progress=True, labelled=where if labelled else None)[cfg.pool]


def _checked_split(data) -> dict:
    from ..data.splits import check_eval_split

    split = check_eval_split(data)
    print(split.describe(), file=sys.stderr)
    return split.to_dict()


def embed_command(args: argparse.Namespace) -> int:
    from . import api
    from .features import save_features

    cfg, model = _prepare(args, EmbedConfig)
    if cfg is None:
        return 0
    data = api.data_for_model(cfg.data, model.config)
    read = api.embedded_split(data, cfg.split) if cfg.modality == "image" else \
        f"the pair source {data.source!r}, one pass"
    out = api.embed(model, data, cfg.split, modality=cfg.modality, pool=cfg.pool, layer=cfg.layer,
                    batch_size=cfg.batch_size, device=_device(cfg), precision=cfg.precision, progress=True)
    path = save_features(out, cfg.out)
    print(f"{out['features'].shape[0]} {cfg.modality} features of dimension {out['features'].shape[1]}, "
          f"{read} -> {path}")
    return 0


def transfer_command(args: argparse.Namespace) -> int:
    from ..config import command_config
    from .probe import run_transfer

    cfg = command_config(args, args.config_cls)
    if cfg is None:
        return 0
    cfg.validate_ready()
    result = run_transfer(cfg)
    if result is not None:
        print(result.describe())
    return 0


def knn_command(args: argparse.Namespace) -> int:
    from . import api

    cfg, model = _prepare(args, KnnConfig)
    if cfg is None:
        return 0
    data = api.data_for_model(cfg.data, model.config)
    split = _checked_split(data)
    accuracy = api.knn(_features(cfg, model, data, "train"), _features(cfg, model, data, "val"), cfg.k, cfg.temperature)
    print(json.dumps({"k": cfg.k, "temperature": cfg.temperature, **accuracy, "split": split}))
    return 0


def ood_command(args: argparse.Namespace) -> int:
    from . import api

    cfg, model = _prepare(args, OodConfig)
    if cfg is None:
        return 0
    data = api.data_for_model(cfg.data, model.config)
    split = _checked_split(data)
    outside_data = api.data_for_model(cfg.data, model.config, source=cfg.out_data, format=cfg.out_format,
                                      eval_train_source="", eval_val_source="", eval_val_fraction=0.0)
    result = api.ood(_features(cfg, model, data, "train"), _features(cfg, model, data, "val"),
                     _features(cfg, model, outside_data, "val", labelled=False))  # scored, never classified
    print(json.dumps({**result, "split": split}))
    return 0
