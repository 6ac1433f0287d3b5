"""Step time of M3AE with the full BERT vocabulary, with the compact one (data.vocab=compact), and of
MAE, at the demo recipe's model size on real captions: the Tux Paint stamps (Debian
`tuxpaint-stamps-default`, GPL-2, fetched into --work, never committed; their .txt first lines as
captions, as bench/tuxpaint_transfer.py lays them out).

    .venv/bin/python bench/compact_vocab.py [--work /tmp/m3ae-tuxpaint] [--steps 40] [--batches 8]
                                            [--text-length 32] [--probe-seeds 0 1 2]

Each variant is a real `Pretrainer` run with the demo recipe (same precision, threads, optimiser), on
`--batches` batches of the real loader read before the clock starts and cycled, so that the time is
the training step's alone and not PNG decoding (the same for all three). Prints one JSON line per
variant (median step seconds over the log windows after the first) and a Markdown row for
docs/BENCHMARKS.md. First, one JSON line compares three ways to a small vocabulary on the held-out
captions (`designs`). With --probe-seeds, M3AE is then pretrained at the demo's budget with each
vocabulary and each seed, on the stamps downscaled once to 64 px (PNG decoding would otherwise
dominate), and scored by bench/tuxpaint_transfer.py's linear probe and kNN.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import m3ae.cli  # noqa: F401  first: idle OpenMP threads sleep, as under `m3ae`, before torch loads
from PIL import Image
from tuxpaint_transfer import build_manifests, evaluate, extract

from m3ae import config as config_io
from m3ae import recipes
from m3ae.data import build_pretrain_loader
from m3ae.engine.metrics import read_metrics
from m3ae.train.pretrain import PretrainConfig, run_pretraining
from m3ae.train.vocabulary import settle_vocabulary

VARIANTS = {"m3ae, full vocabulary": ("m3ae", "full"), "m3ae, compact vocabulary": ("m3ae", "compact"),
            "mae": ("mae", "full")}


def designs(train: Path, val: Path, work: Path) -> dict:
    """On the held-out captions, with a vocabulary made from the training captions: [UNK] share and
    captions whose pieces differ from the official bert-base-uncased ones, for (1) the official pieces
    renumbered (data.vocab=compact), (2) WordPiece over the same tokens as its vocabulary, (3) a
    WordPiece of the same size trained on the training captions (HF tokenizers)."""
    from tokenizers import BertWordPieceTokenizer

    from m3ae.data.tokenizer import Tokenizer

    def captions(path: Path) -> list[str]:
        return [c for c in (json.loads(line)["caption"] for line in path.read_text().splitlines()) if c]

    seen, held_out = captions(train), captions(val)
    full = Tokenizer.from_name("bert-base-uncased")
    official = [e.tokens for e in full.backend.encode_batch(held_out, add_special_tokens=False)]
    vocabulary = full.compact_vocabulary(seen)
    (work / "compact-vocab.txt").write_text("\n".join(vocabulary) + "\n")
    subset = BertWordPieceTokenizer(str(work / "compact-vocab.txt"), lowercase=True)
    trained = BertWordPieceTokenizer(lowercase=True)
    trained.train_from_iterator(seen, vocab_size=len(vocabulary), show_progress=False)
    compact = Tokenizer.from_name("bert-base-uncased", vocabulary=vocabulary)
    pieces = {"renumbered official pieces": [[compact.id_to_token(i) for i in ids] for ids in compact.encode(held_out)]}
    for name, backend in (("WordPiece over the same tokens", subset), ("WordPiece trained on the captions", trained)):
        pieces[name] = [e.tokens for e in backend.encode_batch(held_out, add_special_tokens=False)]
    out = {"vocabulary": len(vocabulary), "train_captions": len(seen), "val_captions": len(held_out)}
    for name, tokens in pieces.items():
        total = sum(len(t) for t in tokens)
        out[name] = {
            "unk_token_share": round(sum(t.count("[UNK]") for t in tokens) / total, 4),
            "captions_with_unk": round(sum("[UNK]" in t for t in tokens) / len(tokens), 4),
            # a piece other than [UNK] where the official one differs, or another token count
            "captions_split_differently": round(sum(
                len(t) != len(o) or any(a != b and a != "[UNK]" for a, b in zip(t, o))
                for t, o in zip(tokens, official)) / len(tokens), 4),
        }
    return out


def step_time(source: Path, model_type: str, vocab: str, steps: int, batches: int, out: Path,
              text_length: int) -> dict:
    overrides = {"model.model_type": model_type, "model.vocab_size": 30522, "model.text_length": text_length,
                 "data.source": str(source),
                 "data.tokenizer": "bert-base-uncased", "data.vocab": vocab, "train.total_steps": steps,
                 "log.every": 10, "log.progress": False, "log.figures_every": 0, "checkpoint.every": 10 * steps,
                 "out_dir": str(out)}
    cfg = config_io.load(PretrainConfig, recipes.resolve("demo"), overrides)
    cfg.model = settle_vocabulary(cfg.model, cfg.data, None)
    loader = build_pretrain_loader(cfg.data, cfg.train.batch_size, vocabulary=cfg.model.vocabulary)
    held = list(itertools.islice(iter(loader), batches))
    run_pretraining(cfg, loader=itertools.cycle(held))
    rows = [row for row in read_metrics(out / "metrics.jsonl") if "step_s" in row]
    text = [b["text"][~b["text_padding_mask"]] for b in held] if model_type == "m3ae" else []
    return {"vocab_size": cfg.model.vocab_size if model_type == "m3ae" else 0,
            "step_s": statistics.median(row["step_s"] for row in rows[1:]),
            "windows": [round(row["step_s"], 4) for row in rows],
            "real_tokens_per_caption": (sum(t.numel() for t in text) / (len(held) * cfg.train.batch_size)) if text else 0}


def downscaled(manifest: Path, work: Path, side: int = 64) -> Path:
    """A copy of `manifest` whose images are the stamps shrunk to a shorter side of at most `side`
    pixels (a long thin stamp must stay wider than the loader's minimum), RGBA kept."""
    out = work / f"{manifest.stem}-{side}px.jsonl"
    if not out.is_file():
        (work / f"{side}px").mkdir(exist_ok=True)
        rows = [json.loads(line) for line in manifest.read_text().splitlines()]
        for row in rows:
            small = work / f"{side}px" / f"{row['key']}.png"
            with Image.open(row["image"]) as image:
                scale = min(1.0, side / min(image.size))
                image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.LANCZOS).save(small)
            row["image"] = str(small)
        out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return out


def probe(train: Path, val: Path, vocab: str, seed: int, text_length: int, out: Path) -> dict:
    overrides = {"model.vocab_size": 30522, "model.text_length": text_length, "data.source": str(train),
                 "data.tokenizer": "bert-base-uncased", "data.vocab": vocab, "train.seed": seed, "data.seed": seed,
                 "log.progress": False, "log.figures_every": 0, "out_dir": str(out / "run")}
    cfg = config_io.load(PretrainConfig, recipes.resolve("demo"), overrides)
    start = time.perf_counter()
    run_pretraining(cfg, resume="auto")
    return {"vocab_size": cfg.model.vocab_size, "pretrain_s": round(time.perf_counter() - start, 1), **evaluate(str(out / "run"), train, val, out / "probe", 100, 0.1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="/tmp/m3ae-tuxpaint")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--text-length", type=int, default=32, help="caption tokens (the demo recipe: 32)")
    parser.add_argument("--probe-seeds", type=int, nargs="*", default=[])
    args = parser.parse_args()
    work = Path(args.work)
    train, val, _ = build_manifests(extract(work), work)
    print(json.dumps({"designs": designs(train, val, work)}), flush=True)
    if args.probe_seeds:
        small_train, small_val = downscaled(train, work), downscaled(val, work)
        for seed in args.probe_seeds:
            for vocab in ("compact", "full"):
                out = work / f"probe-{vocab}-L{args.text_length}-seed{seed}"
                result = probe(small_train, small_val, vocab, seed, args.text_length, out)
                print(json.dumps({"probe": vocab, "seed": seed, "text_length": args.text_length, **result}), flush=True)
        return
    results = {}
    with tempfile.TemporaryDirectory() as runs:
        for name, (model_type, vocab) in VARIANTS.items():
            results[name] = step_time(train, model_type, vocab, args.steps, args.batches, Path(runs) / vocab / model_type,
                                      args.text_length)
            print(json.dumps({"variant": name, **results[name]}), flush=True)
    mae = results["mae"]["step_s"]
    load = os.getloadavg()
    print(f"| text length {args.text_length}, load {load[0]:.1f} | "
          + " | ".join(f"{name}: {r['step_s']:.3f} s ({r['step_s'] / mae:.2f}× MAE)" for name, r in results.items())
          + " |")


if __name__ == "__main__":
    main()
