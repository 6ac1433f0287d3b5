"""`m3ae bench` times the step that `m3ae pretrain` runs: both are timed here on the same shapes, in
one run, each in its own process with the same precision and threads.

    python bench/step_agreement.py [--steps 60] [--precision fp32] [--threads 1]

Pretraining: the `tiny` recipe (64 px, 32 tokens, batch 32, the embedded dataset, one loader worker)
for `--steps` steps, logged every 10; its step time is the median of the logged windows after the
first (which holds the warm-up), with and without the loader's wait. Bench: `m3ae bench` with the
recipe's shapes and the run's own vocabulary size. Prints one JSON line with both and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--threads", default="1")
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": args.threads}
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        subprocess.run([sys.executable, "-m", "m3ae.cli", "pretrain", "--out-dir", str(run), "--max-steps",
                        str(args.steps), "--precision", args.precision, "--threads", args.threads,
                        "--log.every", "10", "--log.progress", "false", "--log.figures-every", "0",
                        "--checkpoint.every", "100000"], check=True, env=env, capture_output=True)
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][1:]
        # the run's own text table: pretraining sizes it to the captions (data.vocab compact)
        vocab = json.loads(next(run.glob("checkpoints/step_*/config.json")).read_text())["vocab_size"]
    step_s = statistics.median(r["step_s"] for r in records)
    compute_s = statistics.median(r["step_s"] * (1 - r["data_wait"]) for r in records)
    bench = json.loads(subprocess.run(
        [sys.executable, "-m", "m3ae.cli", "bench", "--preset", "tiny", "--image-size", "64", "--text-length", "32",
         "--batch-size", "32", "--vocab-size", str(vocab), "--precision", args.precision, "--threads", args.threads, "--steps", "10",
         "--warmup", "3", "--json"], check=True, env=env, capture_output=True, text=True).stdout)
    print(json.dumps({"pretrain_step_s": step_s, "pretrain_step_s_without_data_wait": compute_s,
                      "bench_step_s": bench["step_s"], "ratio_bench_to_pretrain_compute": bench["step_s"] / compute_s,
                      "vocab_size": vocab, "precision": bench["precision"], "threads": bench["threads"], "load": os.getloadavg()}))


if __name__ == "__main__":
    main()
