"""torch.compile on and off for the pretraining step (`m3ae bench`'s step, `train.compile`), per model
and precision: steady-state step time, compile time apart, and recompilations.

Each measurement is its own process, so every compiled run compiles from nothing: a fresh
TORCHINDUCTOR_CACHE_DIR (no FX-graph or kernel cache from an earlier run), TORCH_LOGS=recompiles
to count the guards that fail after the first compilation. Compile time = the untimed steps'
time minus as many steady steps. Eager and compiled runs of one configuration alternate, so both
see the same load.

    python bench/compile_step.py --models demo small224 --precisions fp32 bf16 \
        --out bench/results/compile_step_cpu.jsonl
"""

from __future__ import annotations

import argparse
import os
import tempfile

from _process import MODELS, append_jsonl, model_process


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS), help="models to time")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], help="train.precision values")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 20 demo, 5 small224)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first; the compilation happens in them")
    p.add_argument("--threads", default="auto", help="train.threads")
    p.add_argument("--rounds", type=int, default=1, help="eager/compiled alternations per configuration")
    p.add_argument("--out", help="JSON lines appended here")
    return p.parse_args(argv)


def measure(name: str, precision: str, compile_: bool, a: argparse.Namespace) -> dict:
    spec = {"model": name, "precision": precision, "compile": compile_, "warmup": a.warmup,
            "threads": int(a.threads) if a.threads.isdigit() else a.threads}
    if a.steps:
        spec["steps"] = a.steps
    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="m3ae-inductor-") as cache:
        row = model_process(spec, dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, TORCH_LOGS="recompiles"), lines)
    # TORCH_LOGS=recompiles: "Recompiling function ..." then the failed guard two lines below
    recompiles = [" ".join(lines[i:i + 3]) for i, line in enumerate(lines) if "Recompiling function" in line]
    steady = row["step_s"]
    row.update(
        # the untimed steps hold the compilation; what they took beyond steady steps is its cost
        compile_s=sum(row["warmup_times"]) - steady * len(row["warmup_times"]),
        recompiles=len(recompiles), recompile_reasons=sorted({_reason(r) for r in recompiles})[:10],
    )
    return row


def _reason(record: str) -> str:
    return record.split("[__recompiles]")[-1].strip()[:300]


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    for name in a.models:
        for precision in a.precisions:
            for rnd in range(a.rounds):
                for compile_ in ((False, True) if rnd % 2 == 0 else (True, False)):
                    row = measure(name, precision, compile_, a)
                    row["round"] = rnd
                    print(f"{name:9s} {precision} compile={str(compile_):5s} step {row['step_s']:.3f} s "
                          f"cpu {row['step_cpu_s']:.3f} s "
                          f"(min {row['step_s_min']:.3f})  compile {row['compile_s']:.1f} s  "
                          f"recompiles {row['recompiles']}  threads {row['threads']}  load {row['load_before']}",
                          flush=True)
                    append_jsonl(a.out, row)


if __name__ == "__main__":
    main()
