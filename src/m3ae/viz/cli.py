"""Figure commands: reconstruct (Fig. 1), attention (Figs. 7-8), tsne (Fig. 9), report."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


MODEL_HELP = "a model directory, a pretraining run directory (its newest good checkpoint) or a Hub repo id"


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..engine.runtime import add_threads_argument

    reconstruct = subparsers.add_parser("reconstruct", help="reconstructions of given images and captions (paper Fig. 1)")
    reconstruct.add_argument("model_dir", help=MODEL_HELP)
    reconstruct.add_argument("--images", nargs="+", required=True)
    reconstruct.add_argument("--captions", nargs="*", default=None, help="one per image; omit for image-only")
    reconstruct.add_argument("--out", default="reconstruction.png")
    reconstruct.add_argument("--image-mask-ratio", type=float, help="default: the model's")
    reconstruct.add_argument("--text-mask-ratio", type=float, help="default: the model's")
    reconstruct.add_argument("--top-k", type=int, default=3)
    _common(reconstruct)
    reconstruct.set_defaults(func=run_reconstruct)

    attention = subparsers.add_parser("attention", help="word->patch and patch->word attention maps (paper Figs. 7-8)")
    attention.add_argument("model_dir", help=MODEL_HELP)
    attention.add_argument("--image", required=True)
    attention.add_argument("--caption", required=True)
    attention.add_argument("--words", nargs="*", help="words to map over the image (default: up to 5 of the caption's)")
    attention.add_argument("--patch", help="ROW,COL of the patch whose attention over the words is shown "
                                            "(default: the patch the first word attends to most)")
    attention.add_argument("--layer", default="-1", help="a layer index, or 'mean' over layers")
    attention.add_argument("--head", default="mean", help="a head index, 'mean' or 'max'")
    attention.add_argument("--out-prefix", default="attention", help="writes PREFIX_words.png and PREFIX_patch.png")
    _common(attention)
    attention.set_defaults(func=run_attention)

    tsne = subparsers.add_parser("tsne", help="t-SNE of image features coloured by label, one panel per model (Fig. 9)")
    tsne.add_argument("--model", action="append", required=True, metavar="NAME=DIR",
                      help="a model to embed (" + MODEL_HELP + "), e.g. --model M3AE=runs/a --model MAE=runs/b")
    tsne.add_argument("--data", default="embedded", help="labelled source (see docs/DATA.md); default: embedded")
    tsne.add_argument("--split", default="val", choices=["train", "val"])
    tsne.add_argument("--max-samples", type=int, default=1000)
    tsne.add_argument("--out", default="tsne.png")
    tsne.add_argument("--normalization", help="input normalisation preset (default: the checkpoint run's)")
    tsne.add_argument("--seed", type=int, default=0)
    add_threads_argument(tsne)
    tsne.set_defaults(func=run_tsne)

    report = subparsers.add_parser("report", help="one self-contained HTML page for a run directory")
    report.add_argument("run_dir")
    report.add_argument("--out", help="output path (default RUN_DIR/report.html)")
    report.set_defaults(func=run_report)


def _common(parser: argparse.ArgumentParser) -> None:
    from ..engine.runtime import add_threads_argument

    parser.add_argument("--normalization", help="input normalisation preset (default: the checkpoint run's, else cc12m)")
    parser.add_argument("--tokenizer", default="bert-base-uncased")
    parser.add_argument("--seed", type=int, default=0, help="masking noise seed")
    add_threads_argument(parser)


def _load(args: argparse.Namespace, **overrides):
    from ..model import M3AE
    from .inputs import checkpoint_normalization

    model = M3AE.from_pretrained(args.model_dir, **{k: v for k, v in overrides.items() if v is not None}).eval()
    return model, args.normalization or checkpoint_normalization(args.model_dir)


def run_reconstruct(args: argparse.Namespace) -> int:
    import torch

    from .inputs import load_images, normalization_stats, tokenize
    from .reconstruction import caption_predictions, plot_reconstructions, reconstruct_images

    model, normalization = _load(args, image_mask_ratio=args.image_mask_ratio, text_mask_ratio=args.text_mask_ratio)
    image, _ = load_images(args.images, model.config.image_size, normalization)
    captions = args.captions or None
    if captions is not None and len(captions) != len(args.images):
        raise SystemExit(f"--captions: {len(captions)} given for {len(args.images)} images")
    torch.manual_seed(args.seed)
    with torch.no_grad():
        if captions and model.config.has_text:
            text, pad, tokenizer = tokenize(model, captions, args.tokenizer)
            out = model(image, text, pad)
            predictions = caption_predictions(text, pad, out, tokenizer.backend.id_to_token, args.top_k)
        else:
            out, predictions = model(image), None
    mean, std = normalization_stats(normalization)
    path = plot_reconstructions(reconstruct_images(model, image, out), args.out, mean, std, predictions,
                                title=f"{Path(args.model_dir).name}: image mask {model.config.image_mask_ratio:.0%}")
    for prediction in predictions or []:
        print(prediction.render())
    print(f"wrote {path}")
    return 0


def _word_positions(tokens: list[str], wanted: list[str] | None) -> list[int]:
    if not wanted:
        return list(range(min(5, len(tokens))))
    positions = []
    for word in wanted:
        if word.lower() not in tokens:
            raise SystemExit(f"--words: {word!r} is not a token of the caption {tokens}")
        positions.append(tokens.index(word.lower()))
    return positions


def run_attention(args: argparse.Namespace) -> int:
    from .attention import attention_matrix, patch_to_words, plot_patch_attention, plot_word_attention, word_to_patches
    from .inputs import load_images, tokenize

    model, normalization = _load(args)
    if not model.config.has_text:
        raise SystemExit(f"{args.model_dir} is an image-only model: it has no word-image attention")
    image, picture = load_images([args.image], model.config.image_size, normalization)
    text, pad, tokenizer = tokenize(model, [args.caption], args.tokenizer)
    length = int((~pad[0]).sum())
    tokens = [tokenizer.backend.id_to_token(int(i)) for i in text[0, :length]]
    layer = args.layer if args.layer == "mean" else int(args.layer)
    head = args.head if args.head in ("mean", "max") else int(args.head)
    attention = attention_matrix(model, image, text, pad, layer=layer, head=head)[0]
    N, g = model.config.num_patches, model.config.grid_size
    words = _word_positions(tokens, args.words)
    maps = {w: word_to_patches(attention, w, N).reshape(g, g).numpy() for w in words}
    if args.patch:
        row, col = (int(v) for v in args.patch.split(","))
        patch = row * g + col
    else:
        patch = int(word_to_patches(attention, words[0], N).argmax())
    where = f"layer {args.layer}, head {args.head}"
    first = plot_word_attention(picture[0], tokens, maps, f"{args.out_prefix}_words.png", f"word → image patches ({where})")
    second = plot_patch_attention(picture[0], tokens, patch, g, patch_to_words(attention, patch, N, length).numpy(),
                                  f"{args.out_prefix}_patch.png", f"image patch {divmod(patch, g)} → words ({where})")
    print(f"wrote {first} and {second}")
    return 0


def run_tsne(args: argparse.Namespace) -> int:
    import torch

    from ..data import DataConfig, build_eval_loader
    from ..data.sources import label_names
    from ..model import M3AE
    from .inputs import checkpoint_normalization
    from .tsne import plot_tsne

    panels = {}
    for spec in args.model:
        name, sep, directory = spec.partition("=")
        if not sep:
            raise SystemExit(f"--model {spec!r}: expected NAME=DIR")
        model = M3AE.from_pretrained(directory).eval()
        data = DataConfig(source=args.data, image_size=model.config.image_size,
                          normalization=args.normalization or checkpoint_normalization(directory))
        features, labels, seen = [], [], 0
        with torch.no_grad():
            for batch in build_eval_loader(data, batch_size=128, split=args.split):
                features.append(model.encode(batch["image"]).cls)
                labels.append(batch["label"])
                seen += len(batch["label"])
                if seen >= args.max_samples:
                    break
        panels[name] = (torch.cat(features)[: args.max_samples].numpy(), torch.cat(labels)[: args.max_samples].numpy())
    class_names = label_names(args.data, split=args.split)
    print(f"wrote {plot_tsne(panels, args.out, class_names, seed=args.seed)}")
    print(json.dumps({name: int(len(labels)) for name, (_, labels) in panels.items()}))
    return 0


def run_report(args: argparse.Namespace) -> int:
    from .report import build_report

    print(f"report: {build_report(args.run_dir, args.out)}")
    return 0
