"""Two forms of one part of the training step, timed against each other on the whole step that
`m3ae bench` times (docs/BENCHMARKS.md, "Attention on CPU" and "GELU under bf16 on CPU"):

- `--switch attention`: the fused kernel (`sdpa`) against the written-out softmax (`math`: one
  baddbmm with the scale and the padding folded in, softmax, bmm);
- `--switch gelu`: ATen's tanh GELU for every dtype (`tanh`) against the model's `gelu`, which
  gives a bfloat16 CPU tensor the erf form (`model`).

One process per model and precision builds the step once and alternates the two forms step by step
(ABBA order), so both see the same weights, heap, threads and machine state; what differs between
two processes on a shared host (±10 % here) does not enter the ratio.

    python bench/step_ab.py --switch attention|gelu [--models demo small224] [--precisions fp32 bf16]
                            [--rounds 6] [--avx2] [--out bench/results/<switch>_cpu.jsonl]
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


def attention_forms(model):
    """sdpa / math: set on every attention module of `model`."""
    from m3ae.model.layers import Attention

    blocks = [m for m in model.modules() if isinstance(m, Attention)]
    assert blocks, "no attention module found"

    def use(impl: str) -> None:
        for block in blocks:
            block.impl = impl

    return ("sdpa", "math"), use


def gelu_forms(model):
    """tanh / model: the GELU the model's layers call, looked up in their module at every call."""
    import torch.nn.functional as F

    from m3ae.model import layers

    forms = {"tanh": lambda x: F.gelu(x, approximate="tanh"), "model": layers.gelu}

    def use(form: str) -> None:
        layers.gelu = forms[form]

    return tuple(forms), use


SWITCHES = {"attention": attention_forms, "gelu": gelu_forms}


def alternate(switch: str, model: str, precision: str, rounds: int, threads: str) -> dict:
    """In this process: `rounds` ABBA rounds of one step with each form, after a warm-up of each."""
    import tempfile

    import torch

    from m3ae.train.bench import _pretrain_config, synthetic_batch
    from m3ae.train.pretrain import Pretrainer

    b, cfg = bench_config({"model": model, "precision": precision,
                           "threads": threads if threads == "auto" else int(threads)})
    with tempfile.TemporaryDirectory(prefix="m3ae-attn-") as out_dir:
        pretrain = _pretrain_config(b, out_dir, cfg)
        pretrain.train.total_steps = 4 * rounds + 4
        batch = synthetic_batch(pretrain.model, b.batch_size, text_length=b.text_length)
        trainer = Pretrainer(pretrain, loader=[batch])
        batches = iter(lambda: batch, None)
        forms, use = SWITCHES[switch](trainer.model)
        trainer.wrapped.train()
        wall: dict[str, list[float]] = {form: [] for form in forms}
        cpu: dict[str, list[float]] = {form: [] for form in forms}
        try:
            order = [forms] + [forms if r % 2 == 0 else forms[::-1] for r in range(rounds)]
            for r, pair in enumerate(order):
                for form in pair:
                    use(form)
                    start, cpu_start = time.perf_counter(), time.process_time()
                    trainer.train_step(batches, trainer.losses)
                    if r > 0:  # round 0 warms both up
                        wall[form].append(time.perf_counter() - start)
                        cpu[form].append(time.process_time() - cpu_start)
        finally:
            trainer.close()
    ratios = [a / b for a, b in zip(wall[forms[0]], wall[forms[1]])]
    return {"switch": switch, "forms": forms, "model": model, "precision": trainer.precision.name,
            "threads": torch.get_num_threads(),
            "rounds": rounds, "step_s": {k: statistics.median(v) for k, v in wall.items()},
            "step_cpu_s": {k: statistics.median(v) for k, v in cpu.items()}, "step_times": wall,
            "first_over_second": statistics.median(ratios), "first_over_second_per_round": ratios,
            "torch": torch.__version__, "capability": torch.backends.cpu.get_cpu_capability()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--switch", required=True, choices=list(SWITCHES), help="which part of the step to vary")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), help="shapes to time")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], help="precisions to time")
    parser.add_argument("--rounds", type=int, default=6, help="ABBA rounds (one step of each form per round)")
    parser.add_argument("--threads", default="auto",
                        help="CPU threads (auto: as m3ae chooses; `m3ae demo` gives each of its 2 runs 1)")
    parser.add_argument("--avx2", action="store_true", help="hold ATen and oneDNN to AVX2 kernels (a laptop's path)")
    parser.add_argument("--out", help="also append every result as a JSON line here")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "PRECISION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        import m3ae.cli  # noqa: F401  first: idle OpenMP threads sleep, as under `m3ae`, before torch loads

        print(json.dumps(alternate(args.switch, *args.one, args.rounds, args.threads)))
        return
    env = {**os.environ, **(AVX2 if args.avx2 else {})}
    kernels = "AVX2 (forced)" if args.avx2 else "native"
    first, second = SWITCHES[args.switch].__doc__.split(":")[0].split(" / ")
    print(f"| model | precision | kernels | {first} step s | {second} step s | {first} / {second} (median of rounds) "
          f"| load before |")
    print("|---|---|---|---|---|---|---|")
    for model in args.models:
        for precision in args.precisions:
            cmd = [sys.executable, str(Path(__file__)), "--switch", args.switch, "--one", model, precision,
                   "--rounds", str(args.rounds), "--threads", args.threads]
            r = {**run_json(cmd, env), "kernels": kernels}
            append_jsonl(args.out, r)
            print(f"| {model} | {r['precision']} | {kernels} | {r['step_s'][first]:.3f} | {r['step_s'][second]:.3f} | "
                  f"{r['first_over_second']:.2f} | {r['load_before'][0]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
