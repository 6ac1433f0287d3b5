"""The CPU heap policy (`m3ae.engine.runtime.cpu_heap`) on and off, alternated: each row one fresh
`m3ae bench` process with `M3AE_CPU_HEAP=keep` (the default) or `system` (glibc's own behaviour),
with the process's page faults and peak resident memory (bench's `max_rss_mb`) (docs/BENCHMARKS.md, "CPU heap").

    python bench/cpu_heap.py [--precisions fp32 bf16] [--pairs 2] [--out bench/results/cpu_heap_cpu.jsonl]
"""

from __future__ import annotations

import argparse
import os
import resource

from _process import append_jsonl, m3ae_bench

CASE = ["--preset", "small", "--image-size", "224", "--batch-size", "8", "--text-length", "64",
        "--vocab-size", "30522", "--steps", "5", "--warmup", "2"]


def bench(heap: str, precision: str) -> dict:
    env = {**os.environ, "M3AE_CPU_HEAP": heap}
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt
    result = m3ae_bench([*CASE, "--precision", precision], env)
    faults = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt - before
    return {**result, "heap_setting": heap, "page_faults": faults}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], help="precisions to time")
    parser.add_argument("--pairs", type=int, default=2, help="keep/system pairs per precision")
    parser.add_argument("--out", help="also append every result as a JSON line here")
    args = parser.parse_args()
    print("| precision | pair | heap | step s | CPU s per step | page faults | peak RSS MiB | load before |")
    print("|---|---|---|---|---|---|---|---|")
    for precision in args.precisions:
        for pair in range(args.pairs):
            order = ("keep", "system") if pair % 2 == 0 else ("system", "keep")  # neither always goes first
            for heap in order:
                r = bench(heap, precision)
                append_jsonl(args.out, r)
                print(f"| {precision} | {pair} | {heap} | {r['step_s']:.3f} | {r['step_cpu_s']:.3f} | "
                      f"{r['page_faults']:,} | {r['max_rss_mb']:.0f} | {r['load_before'][0]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
