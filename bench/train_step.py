"""Training-step throughput matrix of docs/BENCHMARKS.md ("Training step"): `m3ae bench` for small and
base at 256 px (64 tokens, masks 0.75/0.75) in fp32 and bf16, and the comparison point with the
official JAX step (small, 224 px, batch 8, fp32, forward + backward + AdamW: 3.06 s on this CPU).

    python bench/train_step.py [--batch-size 8] [--steps 5] [--out results.jsonl]

Each configuration runs in its own process (`m3ae bench --json`), so one does not warm the next.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

OFFICIAL_JAX_SMALL_224_FP32_S = 3.06


def bench(preset: str, image_size: int, dtype: str, batch_size: int, steps: int) -> dict:
    cmd = [sys.executable, "-m", "m3ae.cli", "bench", "--preset", preset, "--image-size", str(image_size),
           "--batch-size", str(batch_size), "--precision", dtype, "--steps", str(steps), "--json"]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", help="also append every result as a JSON line here")
    args = parser.parse_args()
    runs = [(preset, 256, dtype, args.batch_size) for preset in ("small", "base") for dtype in ("fp32", "bf16")]
    runs += [("small", 224, dtype, 8) for dtype in ("fp32", "bf16")]
    print("| preset | px | batch | dtype | step s | samples/s | model TFLOP/s | peak TFLOP/s | MFU | vs JAX 3.06 s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for preset, size, dtype, batch in runs:
        r = bench(preset, size, dtype, batch, args.steps)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(r) + "\n")
        speedup = f"{OFFICIAL_JAX_SMALL_224_FP32_S / r['step_s']:.2f}×" if (preset, size, batch) == ("small", 224, 8) else ""
        print(f"| {preset} | {size} | {batch} | {dtype} | {r['step_s']:.3f} | {r['samples_per_s']:.2f} | "
              f"{r['flops_per_s'] / 1e12:.3f} | {r['peak_flops_per_s'] / 1e12:.3f} | {100 * r['mfu']:.1f}% | {speedup} |",
              flush=True)


if __name__ == "__main__":
    main()
