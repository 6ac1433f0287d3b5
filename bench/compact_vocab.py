"""Step time of M3AE with the full BERT vocabulary, with the compact one (data.vocab=compact), and of
MAE, at the demo recipe's model size on real captions: the Tux Paint stamps (Debian
`tuxpaint-stamps-default`, GPL-2, fetched into --work, never committed; their .txt first lines as
captions, as bench/tuxpaint_transfer.py lays them out).

    .venv/bin/python bench/compact_vocab.py [--work /tmp/m3ae-tuxpaint] [--steps 40] [--batches 8]

Each variant is a real `Pretrainer` run with the demo recipe (same precision, threads, optimiser), on
`--batches` batches of the real loader read before the clock starts and cycled, so that the time is
the training step's alone and not PNG decoding (the same for all three). Prints one JSON line per
variant (median step seconds over the log windows after the first) and a Markdown row for
docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import tempfile
from pathlib import Path

from tuxpaint_transfer import build_manifests, extract

from m3ae import config as config_io
from m3ae import recipes
from m3ae.data import build_pretrain_loader
from m3ae.engine.metrics import read_metrics
from m3ae.train.pretrain import PretrainConfig, run_pretraining
from m3ae.train.vocabulary import settle_vocabulary

VARIANTS = {"m3ae, full vocabulary": ("m3ae", "full"), "m3ae, compact vocabulary": ("m3ae", "compact"),
            "mae": ("mae", "full")}


def step_time(source: Path, model_type: str, vocab: str, steps: int, batches: int, out: Path) -> dict:
    overrides = {"model.model_type": model_type, "model.vocab_size": 30522, "data.source": str(source),
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
            "real_tokens_per_caption": (sum(t.numel() for t in text) / (len(held) * cfg.train.batch_size)) if text else 0,
            "unknown_token_fraction": (sum(int((t == 1).sum()) for t in text) / sum(t.numel() for t in text))
            if text and vocab == "compact" else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="/tmp/m3ae-tuxpaint")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batches", type=int, default=8)
    args = parser.parse_args()
    work = Path(args.work)
    train, _, _ = build_manifests(extract(work), work)
    results = {}
    with tempfile.TemporaryDirectory() as runs:
        for name, (model_type, vocab) in VARIANTS.items():
            results[name] = step_time(train, model_type, vocab, args.steps, args.batches, Path(runs) / vocab / model_type)
            print(json.dumps({"variant": name, **results[name]}), flush=True)
    mae = results["mae"]["step_s"]
    load = os.getloadavg()
    print(f"| {platform.processor() or platform.machine()}, load {load[0]:.1f} | "
          + " | ".join(f"{name}: {r['step_s']:.3f} s ({r['step_s'] / mae:.2f}× MAE)" for name, r in results.items())
          + " |")


if __name__ == "__main__":
    main()
