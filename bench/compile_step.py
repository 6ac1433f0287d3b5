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
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

# name -> (where the model's widths come from, image px, text length, vocab, batch)
MODELS = {
    "demo": ("recipe:demo", None, None, None, 64),  # the main job's model, its own shapes and vocabulary
    "small224": ("preset:small", 224, 64, 30522, 8),  # the official side-by-side's shapes
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS), help="models to time")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], help="train.precision values")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 20 demo, 5 small224)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first; the compilation happens in them")
    p.add_argument("--threads", default="auto", help="train.threads")
    p.add_argument("--rounds", type=int, default=1, help="eager/compiled alternations per configuration")
    p.add_argument("--out", type=Path, help="JSON lines appended here")
    p.add_argument("--one", nargs=3, metavar=("MODEL", "PRECISION", "COMPILE"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run_one(name: str, precision: str, compile_: bool, a: argparse.Namespace) -> dict:
    from m3ae import recipes
    from m3ae.config import load
    from m3ae.model import M3AEConfig
    from m3ae.train.bench import BenchConfig, run_bench
    from m3ae.train.pretrain import PretrainConfig

    source, image_size, text_length, vocab, batch = MODELS[name]
    kind, value = source.split(":")
    model = load(PretrainConfig, recipes.resolve(value)).model if kind == "recipe" else M3AEConfig.from_preset(value)
    steps = a.steps or (20 if name == "demo" else 5)
    b = BenchConfig(batch_size=batch, image_size=image_size or model.image_size,
                    text_length=text_length or model.text_length, vocab_size=vocab or model.vocab_size,
                    precision=precision, compile=compile_, steps=steps, warmup=a.warmup,
                    threads=int(a.threads) if a.threads.isdigit() else a.threads)
    row = run_bench(b, model)
    row.update(model=name, model_source=source, emb_dim=model.emb_dim, depth=model.depth,
               dec_emb_dim=model.dec_emb_dim, dec_depth=model.dec_depth, patch_size=model.patch_size)
    return row


def measure(name: str, precision: str, compile_: bool, a: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="m3ae-inductor-") as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, TORCH_LOGS="recompiles")
        cmd = [sys.executable, __file__, "--one", name, precision, str(compile_).lower(), "--warmup", str(a.warmup),
               "--threads", str(a.threads)] + (["--steps", str(a.steps)] if a.steps else [])
        before = [round(x, 2) for x in os.getloadavg()]
        start = time.perf_counter()
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    lines = out.stderr.splitlines()
    # TORCH_LOGS=recompiles: "Recompiling function ..." then the failed guard two lines below
    recompiles = [" ".join(lines[i:i + 3]) for i, line in enumerate(lines) if "Recompiling function" in line]
    steady = row["step_s"]
    row.update(
        process_wall_s=wall, loadavg_before=before, loadavg_after=[round(x, 2) for x in os.getloadavg()],
        # the untimed steps hold the compilation; what they took beyond steady steps is its cost
        compile_s=sum(row["warmup_times"]) - steady * len(row["warmup_times"]),
        recompiles=len(recompiles), recompile_reasons=sorted({_reason(r) for r in recompiles})[:10],
        date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    )
    return row


def _reason(record: str) -> str:
    return record.split("[__recompiles]")[-1].strip()[:300]


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    if a.one:
        name, precision, compile_ = a.one
        print(json.dumps(run_one(name, precision, compile_ == "true", a)))
        return
    for name in a.models:
        for precision in a.precisions:
            for rnd in range(a.rounds):
                for compile_ in ((False, True) if rnd % 2 == 0 else (True, False)):
                    row = measure(name, precision, compile_, a)
                    row["round"] = rnd
                    print(f"{name:9s} {precision} compile={str(compile_):5s} step {row['step_s']:.3f} s "
                          f"cpu {row['step_cpu_s']:.3f} s "
                          f"(min {row['step_s_min']:.3f})  compile {row['compile_s']:.1f} s  "
                          f"recompiles {row['recompiles']}  threads {row['threads']}  load {row['loadavg_before']}",
                          flush=True)
                    if a.out:
                        with a.out.open("a") as f:
                            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
