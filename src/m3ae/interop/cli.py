"""`m3ae convert-official`: an official trainer pickle (or npz of flax paths) -> a from_pretrained directory."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert-official",
        help="convert an official JAX M3AE/MAE checkpoint to a from_pretrained directory",
        description="Reads the checkpoint without jax/flax and without executing code from the file.",
    )
    parser.add_argument("checkpoint", help="official .pkl checkpoint, or .npz / pickled dict of flax parameter paths")
    parser.add_argument("out_dir", help="directory to write config.json + model.safetensors")
    parser.add_argument("--num-heads", type=int, help="encoder heads, when the checkpoint cannot tell")
    parser.add_argument("--dec-num-heads", type=int, help="decoder heads, when the checkpoint cannot tell")
    parser.add_argument("--image-size", type=int, help="image size the model will be used at")
    parser.add_argument("--text-length", type=int, help="caption length (tokens)")
    parser.set_defaults(func=run)

    export = subparsers.add_parser(
        "export",
        help="export the image encoder to Hugging Face ViTModel or a timm ViT state dict",
        description="The exported encoder computes the unmasked image-only representation of M3AE.encode.",
    )
    export.add_argument("model_dir", help="a model directory, a pretraining run directory or a Hub repo id")
    export.add_argument("out_dir")
    export.add_argument("--format", choices=["hf", "timm"], default="hf")
    export.add_argument("--normalization", default="cc12m",
                        help="pixel statistics the model was pretrained with (cc12m, imagenet, none), written "
                             "to the HF image processor")
    export.set_defaults(func=run_export)

    push = subparsers.add_parser(
        "push-to-hub", help="upload a model (config.json, model.safetensors, model card) to the Hugging Face Hub",
        description="The model card states the pretraining run's config and length (found beside a checkpoint) "
                    "and the results of the probe runs given with --probe.")
    push.add_argument("model_dir", help="a model directory, a pretraining run directory or a checkpoint directory")
    push.add_argument("repo_id", help="owner/name")
    push.add_argument("--probe", action="append", default=[], metavar="RUN_DIR",
                      help="a linear-probe or finetune run directory whose results.json goes into the card "
                           "(repeatable)")
    push.add_argument("--private", action="store_true")
    push.add_argument("--branch", help="upload to this branch")
    push.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    push.add_argument("--token", help="Hub token (default: the one huggingface_hub has stored)")
    push.set_defaults(func=run_push)


def run_export(args: argparse.Namespace) -> int:
    from ..model import M3AE
    from .export import export

    export(M3AE.from_pretrained(args.model_dir), args.out_dir, args.format, args.normalization)
    print(f"wrote the {args.format} image encoder to {args.out_dir}")
    return 0


def run_push(args: argparse.Namespace) -> int:
    from ..model import M3AE
    from ..model.files import resolve
    from .hub import card_info_from_runs

    directory = resolve(args.model_dir)
    model = M3AE.from_pretrained(directory)
    result = model.push_to_hub(args.repo_id, card_info=card_info_from_runs(directory, args.probe),
                               private=args.private or None, token=args.token, branch=args.branch,
                               create_pr=args.create_pr)
    print(f"pushed {directory} to {args.repo_id}: {result}")
    return 0


def run(args: argparse.Namespace) -> int:
    from .official import convert_official

    model = convert_official(
        args.checkpoint,
        num_heads=args.num_heads,
        dec_num_heads=args.dec_num_heads,
        image_size=args.image_size,
        text_length=args.text_length,
    )
    model.save_pretrained(args.out_dir)
    n_params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"out_dir": str(args.out_dir), "parameters": n_params, "config": model.config.to_dict()}, indent=2))
    return 0
