"""fp32 vs bf16 step time per CPU capability, and 1 vs all threads, for docs/BENCHMARKS.md
("Precision and threads"): `m3ae bench` on the tiny preset (64 px, batch 32, 32 tokens) and the base
preset (224 px, small batch), each configuration in its own process, with the 1-minute load average
read before and after each run.

    python bench/precision_threads.py [--out results.jsonl] [--only tiny|base] [--steps 5] [--avx2]

`--avx2` adds the rows of an AVX2-only CPU (no AVX-512, no AMX: the common laptop) emulated on this
one: ATEN_CPU_CAPABILITY=avx2 and ONEDNN_MAX_CPU_ISA=AVX2 limit torch's and oneDNN's kernels, so
bf16 is computed the way a CPU without native bf16 computes it. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os

from _process import AVX2, append_jsonl, m3ae_bench

CASES = {"tiny": ["--preset", "tiny", "--image-size", "64", "--batch-size", "32", "--text-length", "32"],
         "base": ["--preset", "base", "--image-size", "224", "--batch-size", "4", "--text-length", "64"]}


def bench(case: str, dtype: str, threads: int, steps: int, avx2: bool) -> dict:
    args = [*CASES[case], "--precision", dtype, "--threads", str(threads), "--steps", str(steps), "--warmup", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), **(AVX2 if avx2 else {})}
    return {**m3ae_bench(args, env), "case": case, "kernels": "AVX2 (emulated)" if avx2 else "native"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="also append every result as a JSON line here")
    parser.add_argument("--only", choices=sorted(CASES), action="append")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    parser.add_argument("--avx2", action="store_true", help="add the emulated AVX2-only rows (tiny only)")
    args = parser.parse_args()
    runs = [(case, dtype, threads, False) for case in args.only or CASES for threads in args.threads
            for dtype in ("fp32", "bf16")]
    if args.avx2 and "tiny" in (args.only or CASES):
        runs += [("tiny", dtype, threads, True) for threads in args.threads for dtype in ("fp32", "bf16")]
    print("| case | kernels | dtype | threads | step s | samples/s | MFU | load before / after |")
    print("|---|---|---|---|---|---|---|---|")
    for case, dtype, threads, avx2 in runs:
        r = bench(case, dtype, threads, args.steps, avx2)
        append_jsonl(args.out, r)
        print(f"| {case} | {r['kernels']} | {dtype} | {threads} | {r['step_s']:.3f} | {r['samples_per_s']:.1f} | "
              f"{100 * r['mfu']:.1f}% | {r['load_before'][0]:.2f} / {r['load_after'][0]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
