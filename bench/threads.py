"""`threads: auto` against 1 and every core, in the three conditions of issue 17 item 1, and how
OpenMP's waiting threads behave (docs/BENCHMARKS.md, "Threads"):

- quiet: nothing else started by this script (say the load: the machine may be shared);
- after-busy: right after `--busy-seconds` of one spinning process per core (the 1-minute load
  average then reads high while every core is free: what fooled the old load-average rule);
- one-core-busy: one spinning process for the whole run (a core shared with another job).

Each configuration is a fresh `m3ae bench` process (its JSON line), so the OpenMP runtime reads
the wait policy from the environment as it starts. Wait policies (GNU libgomp, which torch's CPU
wheels ship; KMP_BLOCKTIME is Intel's and libgomp ignores it):

- passive: OMP_WAIT_POLICY=PASSIVE, idle threads sleep at once (what `m3ae` sets when neither
  OMP_WAIT_POLICY nor GOMP_SPINCOUNT is set);
- gomp-default: GOMP_SPINCOUNT=300000, libgomp's own default (spin a while, then sleep);
- active: OMP_WAIT_POLICY=ACTIVE, idle threads spin;
- spin-1k … spin-100k: GOMP_SPINCOUNT=1000 … 100000, a bounded spin before sleeping.

    python bench/threads.py [--conditions quiet after-busy one-core-busy] [--policies passive gomp-default]
                            [--dtype fp32] [--steps 5] [--busy-seconds 60] [--out results.jsonl]

Prints a markdown table with the 1-minute load average before each run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time

from _process import append_jsonl, m3ae_bench

CASE = ["--preset", "tiny", "--image-size", "64", "--batch-size", "32", "--text-length", "32", "--vocab-size", "1000"]
POLICIES = {"passive": {"OMP_WAIT_POLICY": "PASSIVE"}, "gomp-default": {"GOMP_SPINCOUNT": "300000"},
            "active": {"OMP_WAIT_POLICY": "ACTIVE"},
            **{f"spin-{n // 1000}k": {"GOMP_SPINCOUNT": str(n)} for n in (1000, 10000, 30000, 100000)}}
SPIN = "while True: pass"


def spinners(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(count)]


def stop(processes: list[subprocess.Popen]) -> None:
    for p in processes:
        p.kill()
        p.wait()


def bench(threads: str, policy: str, dtype: str, steps: int) -> dict:
    args = [*CASE, "--precision", dtype, "--threads", threads, "--steps", str(steps), "--warmup", "1"]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    env.update(POLICIES[policy])
    return {**m3ae_bench(args, env), "setting": threads, "policy": policy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conditions", nargs="+", default=["quiet", "after-busy", "one-core-busy"])
    parser.add_argument("--policies", nargs="+", default=["passive", "gomp-default"], choices=sorted(POLICIES))
    parser.add_argument("--settings", nargs="+", default=["auto", "1", str(os.cpu_count() or 1)])
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--busy-seconds", type=float, default=60.0)
    parser.add_argument("--out", help="also append every result as a JSON line here")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    print("| condition | wait policy | threads setting | threads used | step s | load before | why |")
    print("|---|---|---|---|---|---|---|")
    for condition in args.conditions:
        for policy in args.policies:
            for setting in args.settings:
                busy = []
                try:
                    if condition == "after-busy":  # every core busy for a while, then free again
                        hogs = spinners(cores)
                        time.sleep(args.busy_seconds)
                        stop(hogs)
                    elif condition == "one-core-busy":
                        busy = spinners(1)
                        time.sleep(1.0)
                    r = bench(setting, policy, args.dtype, args.steps)
                finally:
                    stop(busy)
                r["condition"] = condition
                append_jsonl(args.out, r)
                print(f"| {condition} | {policy} | {setting} | {r['threads']} | {r['step_s']:.3f} | "
                      f"{r['load_before'][0]:.2f} | {r.get('threads_reason', '')} |", flush=True)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # a SIGTERM (a `timeout`) unwinds like Ctrl-C: the spinners are stopped too


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)
    with contextlib.suppress(KeyboardInterrupt):
        main()
