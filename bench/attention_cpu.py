"""Which attention the CPU should run: the fused kernel (`sdpa`) against the written-out softmax
(`math`: one baddbmm with the scale and the padding folded in, softmax, bmm), timed on the whole
training step that `m3ae bench` times (docs/BENCHMARKS.md, "Attention on CPU").

One process per model and precision builds the step once and alternates the two attentions step
by step (ABBA order), so both see the same weights, heap, threads and machine state; what differs
between two processes on a shared host (±10 % here) does not enter the ratio.

    python bench/attention_cpu.py [--models demo small224] [--precisions fp32 bf16] [--rounds 6]
                                  [--avx2] [--out bench/results/attention_cpu.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from _process import AVX2, MODELS, append_jsonl, bench_config, run_json

IMPLS = ("sdpa", "math")


def alternate(model: str, precision: str, rounds: int) -> dict:
    """In this process: `rounds` ABBA rounds of one step with each attention, after a warm-up of each."""
    import tempfile

    import torch

    from m3ae.model.layers import Attention
    from m3ae.train.bench import _pretrain_config, synthetic_batch
    from m3ae.train.pretrain import Pretrainer

    b, cfg = bench_config({"model": model, "precision": precision})
    with tempfile.TemporaryDirectory(prefix="m3ae-attn-") as out_dir:
        pretrain = _pretrain_config(b, out_dir, cfg)
        pretrain.train.total_steps = 4 * rounds + 4
        batch = synthetic_batch(pretrain.model, b.batch_size, text_length=b.text_length)
        trainer = Pretrainer(pretrain, loader=[batch])
        batches = iter(lambda: batch, None)
        blocks = [m for m in trainer.model.modules() if isinstance(m, Attention)]
        assert blocks, "no attention module found"
        trainer.wrapped.train()
        wall: dict[str, list[float]] = {impl: [] for impl in IMPLS}
        cpu: dict[str, list[float]] = {impl: [] for impl in IMPLS}
        try:
            order = [IMPLS] + [IMPLS if r % 2 == 0 else IMPLS[::-1] for r in range(rounds)]
            for r, impls in enumerate(order):
                for impl in impls:
                    for block in blocks:
                        block.impl = impl
                    start, cpu_start = time.perf_counter(), time.process_time()
                    trainer.train_step(batches, trainer.losses)
                    if r > 0:  # round 0 warms both up
                        wall[impl].append(time.perf_counter() - start)
                        cpu[impl].append(time.process_time() - cpu_start)
        finally:
            trainer.close()
    ratios = [s / m for s, m in zip(wall["sdpa"], wall["math"])]
    return {"model": model, "precision": trainer.precision.name, "threads": torch.get_num_threads(),
            "rounds": rounds, "step_s": {k: statistics.median(v) for k, v in wall.items()},
            "step_cpu_s": {k: statistics.median(v) for k, v in cpu.items()}, "step_times": wall,
            "sdpa_over_math": statistics.median(ratios), "sdpa_over_math_per_round": ratios,
            "torch": torch.__version__, "capability": torch.backends.cpu.get_cpu_capability()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), help="shapes to time")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], help="precisions to time")
    parser.add_argument("--rounds", type=int, default=6, help="ABBA rounds (one step of each attention per round)")
    parser.add_argument("--avx2", action="store_true", help="hold ATen and oneDNN to AVX2 kernels (a laptop's path)")
    parser.add_argument("--out", help="also append every result as a JSON line here")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "PRECISION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        import m3ae.cli  # noqa: F401  first: idle OpenMP threads sleep, as under `m3ae`, before torch loads

        print(json.dumps(alternate(*args.one, args.rounds)))
        return
    env = {**os.environ, **(AVX2 if args.avx2 else {})}
    kernels = "AVX2 (forced)" if args.avx2 else "native"
    print("| model | precision | kernels | sdpa step s | math step s | sdpa / math (median of rounds) | load before |")
    print("|---|---|---|---|---|---|---|")
    for model in args.models:
        for precision in args.precisions:
            cmd = [sys.executable, str(Path(__file__)), "--one", model, precision, "--rounds", str(args.rounds)]
            r = {**run_json(cmd, env), "kernels": kernels}
            append_jsonl(args.out, r)
            print(f"| {model} | {r['precision']} | {kernels} | {r['step_s']['sdpa']:.3f} | {r['step_s']['math']:.3f} | "
                  f"{r['sdpa_over_math']:.2f} | {r['load_before'][0]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
