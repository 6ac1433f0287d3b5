"""Loader throughput: samples/s per worker at 256 px from JPEG tar shards, tokenised.

    .venv/bin/python bench/bench_loader.py [--source SHARDS] [--workers 0 1 2] [--batches 40]
                                           [--memory-cache-mb MB --warmup-batches N]

With --memory-cache-mb, time the epochs after the first: --warmup-batches should cover one epoch
(the cache fills while it is read), e.g. 157 for the 10,000 embedded samples at batch 64.

Without --source, JPEG shards of photo-like 384x288 images (procedural scenes upscaled, with
sensor-like noise so the JPEGs are as costly to decode as camera pictures) are written once to
--cache. Prints one JSON line per setting and a Markdown table for docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
from PIL import Image

from m3ae.data import DataConfig, build_pretrain_loader
from m3ae.data.synth import render_scene
from m3ae.data.writer import ShardWriter


def make_shards(root: Path, count: int, per_shard: int = 500) -> str:
    if not (root / "done").is_file():
        rng = np.random.default_rng(0)
        with ShardWriter(root, "bench", per_shard) as writer:
            for index in range(count):
                scene, caption, attributes = render_scene(0, "train", index, 96)
                photo = np.asarray(scene.resize((384, 288), Image.Resampling.BICUBIC), dtype=np.float32)
                photo = np.clip(photo + rng.normal(0, 8, photo.shape), 0, 255).astype(np.uint8)
                encoded = io.BytesIO()
                Image.fromarray(photo).save(encoded, format="JPEG", quality=90)
                writer.write(f"{index:09d}", encoded.getvalue(), caption, attributes["label"])
        (root / "done").write_text(str(count))
    return str(root / "bench-*.tar")


def measure(source: str, workers: int, batches: int, batch_size: int, image_size: int, cache_mb: int = 0,
            warmup: int = 0, crop_scale: tuple[float, float] = (0.2, 1.0)) -> dict:
    cfg = DataConfig(source=source, image_size=image_size, text_length=64, num_workers=workers,
                     memory_cache_mb=cache_mb, crop_scale=crop_scale)
    loader = iter(build_pretrain_loader(cfg, batch_size=batch_size))
    for _ in range(max(2, workers, warmup)):  # worker start-up and the first prefetch are not throughput
        next(loader)
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    seconds = time.perf_counter() - start
    rate = batches * batch_size / seconds
    return {"workers": workers, "memory_cache_mb": cache_mb, "warmup_batches": warmup, "samples_per_s": round(rate, 1),
            "samples_per_s_per_worker": round(rate / max(1, workers), 1), "seconds": round(seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="", help="shards to read (default: generated JPEG shards)")
    parser.add_argument("--cache", default="/tmp/m3ae-bench-shards")
    parser.add_argument("--samples", type=int, default=4000, help="generated samples")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--crop-scale", type=float, nargs=2, default=(0.2, 1.0), help="RandomResizedCrop area range")
    parser.add_argument("--memory-cache-mb", type=int, default=0, help="data.memory_cache_mb (0: off)")
    parser.add_argument("--warmup-batches", type=int, default=0, help="untimed batches first (an epoch to fill the cache)")
    args = parser.parse_args()
    source = args.source or make_shards(Path(args.cache), args.samples)
    rows = []
    for workers in args.workers:
        row = measure(source, workers, args.batches, args.batch_size, args.image_size, args.memory_cache_mb,
                      args.warmup_batches, tuple(args.crop_scale))
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\nMachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average before run {os.getloadavg()[0]:.1f}; image {args.image_size} px, batch {args.batch_size}\n")
    print("| DataLoader workers (0 = in the main process) | samples/s | samples/s per worker |\n|---|---|---|")
    for row in rows:
        print(f"| {row['workers']} | {row['samples_per_s']} | {row['samples_per_s_per_worker']} |")

if __name__ == "__main__":
    main()
