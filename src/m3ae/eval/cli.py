"""`m3ae embed`, `linear-probe`, `finetune`, `knn`, `ood` and `demo`. Heavy imports stay in handlers."""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path


def _add_feature_arguments(p: argparse.ArgumentParser) -> None:
    from ..engine.runtime import add_threads_argument

    p.add_argument("--checkpoint", required=True, help="model directory, checkpoint step directory, run directory or Hub repo id")
    p.add_argument("--data", default="embedded", help="labelled source: image folder, .tar shards with .cls, "
                   "HDF5 ({split}_jpg/_labels), manifest, or 'embedded' (default)")
    p.add_argument("--train-data", default="", help="the training split when --data does not separate splits "
                   "(e.g. 'dir/train-*.tar'); default: derived from --data")
    p.add_argument("--val-data", default="", help="the evaluation split, likewise")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="hold out this fraction of the training source by key hash as the evaluation split "
                        "(for sources without separate splits)")
    p.add_argument("--format", default="auto", help="source format (auto, wds, hdf5, manifest, folder, flat, parquet)")
    p.add_argument("--normalization", default="cc12m", help="pixel statistics preset (cc12m, imagenet, none)")
    p.add_argument("--pool", choices=["cls", "mean"], default="cls")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="auto: bf16 where the device computes it natively and faster, else fp32")
    p.add_argument("--device", default="auto", help="auto: CUDA when available")
    add_threads_argument(p)


def register(subparsers) -> None:
    from ..config import add_override_alias, add_override_arguments
    from .probe import FinetuneConfig, LinearProbeConfig

    e = subparsers.add_parser("embed", help="features of images, captions or pairs from any checkpoint",
                              description="Writes features, labels and keys (.safetensors or .npz).")
    _add_feature_arguments(e)
    e.add_argument("--split", choices=["train", "val"], default="val")
    e.add_argument("--modality", choices=["image", "text", "pair"], default="image",
                   help="text and pair read captions from the pair source (--data), in its streaming order")
    e.add_argument("--layer", type=int, help="block 1..depth (before the final norm); default: the encoder output")
    e.add_argument("--out", required=True, help="output file: .safetensors or .npz")
    e.set_defaults(func=embed_command)

    for name, cls, help_text in (
        ("linear-probe", LinearProbeConfig, "linear probe of a frozen encoder (BatchNorm + Linear, LARS)"),
        ("finetune", FinetuneConfig, "full fine-tuning (layer decay, drop-path, mixup/CutMix, AdamW)"),
    ):
        p = subparsers.add_parser(name, help=help_text, description=f"{help_text}. Any config field is an "
                                  f"override, e.g. --checkpoint RUN --data.source DIR --epochs 10.")
        p.add_argument("--config", help="YAML file with config fields")
        p.add_argument("--resume", help="'auto': the latest good checkpoint in --out-dir, if any; or a checkpoint")
        p.add_argument("--print-config", action="store_true",
                       help="print the resolved config as YAML (readable by --config) and exit")
        add_override_arguments(p, cls)
        # the names knn and ood take
        add_override_alias(p, "--val-data", "data.eval_val_source")
        add_override_alias(p, "--val-fraction", "data.eval_val_fraction")
        p.set_defaults(func=transfer_command, config_cls=cls, command_name=name)

    k = subparsers.add_parser("knn", help="k-NN accuracy on frozen features (cosine, temperature-weighted)")
    _add_feature_arguments(k)
    k.add_argument("--k", type=int, default=20)
    k.add_argument("--temperature", type=float, default=0.07)
    k.set_defaults(func=knn_command)

    o = subparsers.add_parser("ood", help="out-of-distribution detection: Mahalanobis and max-softmax AUROC")
    _add_feature_arguments(o)
    o.add_argument("--out-data", required=True, help="out-of-distribution labelled source (its val split)")
    o.add_argument("--out-format", default="auto")
    o.set_defaults(func=ood_command)

    from .demo import register as register_demo

    register_demo(subparsers)


def _device(args: argparse.Namespace):
    from ..engine.runtime import resolve_device

    return resolve_device(args.device)


def _resolve_precision(args: argparse.Namespace) -> None:
    """Replaces --precision auto by the precision it resolves to here, and says which and why."""
    from ..engine.runtime import resolve_precision

    precision = resolve_precision(args.precision, _device(args))
    print(precision.describe(), file=sys.stderr)
    args.precision = precision.name


def _data_config(args: argparse.Namespace, model, **fields):
    from ..data import DataConfig

    return DataConfig(**{**dict(source=args.data, format=args.format, normalization=args.normalization,
                                image_size=model.config.image_size, text_length=model.config.text_length,
                                num_workers=0, eval_train_source=args.train_data, eval_val_source=args.val_data,
                                eval_val_fraction=args.val_fraction), **fields})


def _features(args: argparse.Namespace, model, data, split: str, labelled: bool = True) -> dict:
    from ..data import build_eval_loader
    from .features import FeatureSpec, extract_features, require_labels

    out = extract_features(model, build_eval_loader(data, args.batch_size, split=split),
                           FeatureSpec("image", args.pool), _device(args), args.precision, progress=True)
    if labelled:
        require_labels(out["labels"], f"data source {data.source!r} ({split} split)")
    return out


def _checked_split(data) -> dict:
    from ..data.splits import check_eval_split

    split = check_eval_split(data)
    print(split.describe(), file=sys.stderr)
    return split.to_dict()


def _one_line_errors(command):
    """Errors in what the user gave (data, paths) as one line and exit status 2, not a traceback."""

    @functools.wraps(command)
    def wrapped(args: argparse.Namespace) -> int:
        from ..data.config import SizeMismatchError
        from ..data.splits import OverlappingSplitsError
        from .features import MissingLabelsError

        try:
            return command(args)
        except (OverlappingSplitsError, MissingLabelsError, SizeMismatchError, FileNotFoundError) as error:
            print(f"m3ae {args.command}: error: {error}", file=sys.stderr)
            return 2

    return wrapped


@_one_line_errors
def embed_command(args: argparse.Namespace) -> int:
    from ..data import build_eval_loader
    from ..data.loader import BatchStream, PretrainLoader
    from ..model import M3AE
    from .features import FeatureSpec, extract_features, save_features

    _resolve_precision(args)
    model = M3AE.from_pretrained(args.checkpoint)
    data = _data_config(args, model)
    if args.modality == "image":
        if args.split == "val":  # the scoring side: it must not repeat the training side
            _checked_split(data)
        batches = build_eval_loader(data, args.batch_size, split=args.split)
    else:  # captions come from the pair source, one pass with the evaluation transform
        batches = PretrainLoader(BatchStream(data, args.batch_size, 0, 1, epochs=1, train_transform=False))
    out = extract_features(model, batches, FeatureSpec(args.modality, args.pool, args.layer), _device(args),
                           args.precision, progress=True)
    path = save_features(out, args.out)
    print(f"{out['features'].shape[0]} features of dimension {out['features'].shape[1]} -> {path}")
    return 0


@_one_line_errors
def transfer_command(args: argparse.Namespace) -> int:
    from .. import config as config_io
    from ..config import ConfigError
    from .probe import run_transfer

    try:
        cfg = config_io.load(args.config_cls, args.config, config_io.collect_overrides(args))
        cfg.validate_ready()
        if args.resume == "auto" and cfg.out_dir is None:
            raise ConfigError("--resume auto: needs --out-dir, the run to continue")
    except (ConfigError, ValueError) as e:
        print(f"m3ae {args.command_name}: config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(config_io.to_yaml(cfg), end="")
        return 0
    result = run_transfer(cfg, resume=args.resume)
    if result is not None:
        print(result.describe())
    return 0


@_one_line_errors
def knn_command(args: argparse.Namespace) -> int:
    from ..model import M3AE
    from .knn import knn_predict, topk_accuracy

    _resolve_precision(args)
    model = M3AE.from_pretrained(args.checkpoint)
    data = _data_config(args, model)
    split = _checked_split(data)
    train, val = _features(args, model, data, "train"), _features(args, model, data, "val")
    classes = int(max(train["labels"].max(), val["labels"].max())) + 1
    scores = knn_predict(train["features"], train["labels"], val["features"], classes, args.k, args.temperature)
    accuracy = topk_accuracy(scores, val["labels"])
    print(json.dumps({"k": args.k, "temperature": args.temperature, **accuracy, "split": split}))
    return 0


@_one_line_errors
def ood_command(args: argparse.Namespace) -> int:
    from ..model import M3AE
    from .ood import MahalanobisScorer, auroc, fit_softmax_head, max_softmax_score

    _resolve_precision(args)
    model = M3AE.from_pretrained(args.checkpoint)
    data = _data_config(args, model)
    split = _checked_split(data)
    train, inside = _features(args, model, data, "train"), _features(args, model, data, "val")
    outside_data = _data_config(args, model, source=args.out_data, format=args.out_format, eval_train_source="",
                                eval_val_source="", eval_val_fraction=0.0)
    outside = _features(args, model, outside_data, "val", labelled=False)  # scored, never classified
    mahalanobis = MahalanobisScorer(train["features"], train["labels"])
    head = fit_softmax_head(train["features"], train["labels"])
    result = {
        "mahalanobis_auroc": auroc(mahalanobis(inside["features"]), mahalanobis(outside["features"])),
        "max_softmax_auroc": auroc(max_softmax_score(head(inside["features"])),
                                   max_softmax_score(head(outside["features"]))),
        "in_samples": int(inside["labels"].numel()), "out_samples": int(outside["labels"].numel()),
        "split": split,
    }
    print(json.dumps(result))
    return 0
