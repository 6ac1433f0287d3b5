"""`m3ae data {synth,build,inspect}`."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="datasets: generate, convert, inspect")
    commands = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)

    synth = commands.add_parser("synth", help="generate the embedded procedural image-caption dataset")
    synth.add_argument("out", help="output directory (created; left unchanged if it already holds this dataset)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--train", type=int, default=10_000, help="training samples")
    synth.add_argument("--val", type=int, default=2_000, help="held-out labelled samples")
    synth.add_argument("--image-size", type=int, default=32)
    synth.add_argument("--shard-size", type=int, default=500)
    synth.set_defaults(func=_synth)

    build = commands.add_parser("build", help="convert a manifest (JSONL/CSV) or image folder into tar shards")
    build.add_argument("source")
    build.add_argument("out", help="output directory")
    build.add_argument("--format", default="auto", choices=["auto", "wds", "hdf5", "manifest", "folder"])
    build.add_argument("--shard-size", type=int, default=1000)
    build.add_argument("--prefix", default="shard")
    build.set_defaults(func=_build)

    inspect = commands.add_parser("inspect", help="print JSON statistics of a source")
    inspect.add_argument("source")
    inspect.add_argument("--format", default="auto", choices=["auto", "wds", "hdf5", "manifest", "folder"])
    inspect.add_argument("--limit", type=int, default=None, help="read at most this many records")
    inspect.add_argument("--tokenizer", default="bert-base-uncased")
    inspect.add_argument("--text-length", type=int, default=64)
    inspect.set_defaults(func=_inspect)


def _synth(args: argparse.Namespace) -> int:
    import time

    from m3ae.data.synth import ensure_embedded_dataset

    start = time.perf_counter()
    root = ensure_embedded_dataset(args.out, args.seed, args.train, args.val, args.image_size, args.shard_size)
    print(json.dumps({"root": str(root), "seconds": round(time.perf_counter() - start, 1),
                      **json.loads((root / "manifest.json").read_text())}, indent=1))
    return 0


def _build(args: argparse.Namespace) -> int:
    from m3ae.data.writer import build_shards

    print(json.dumps(build_shards(args.source, args.out, args.format, args.shard_size, args.prefix), indent=1))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from m3ae.data.inspect import inspect_source

    print(json.dumps(inspect_source(args.source, args.format, args.limit, args.tokenizer, args.text_length), indent=1))
    return 0
