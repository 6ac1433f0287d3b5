"""What the bench/ scripts share: the models they time, one measuring process run to its last line of
JSON with the wall time and the load around it, and results appended as JSON lines (imported by the
scripts beside it; `python bench/_process.py '{"model": "demo", ...}'` is the measuring process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

# The AVX2 laptop path on a newer CPU: ATen's and oneDNN's kernels both held to AVX2.
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


# name -> (where the model's widths come from, image px, text length, vocab, batch)
MODELS = {
    "demo": ("recipe:demo", None, None, None, 64),  # the main job's model, its own shapes and vocabulary
    "small224": ("preset:small", 224, 64, 30522, 8),  # the official side-by-side's shapes
}


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run_json(cmd: list[str], env: dict[str, str] | None = None, stderr: list[str] | None = None) -> dict:
    """Run `cmd`, parse the JSON object on its last stdout line, and add `process_wall_s`,
    `load_before` / `load_after` (1, 5, 15-minute averages) and `date`; its stderr lines are
    appended to `stderr` when given."""
    before = loadavg()
    start = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    if stderr is not None:
        stderr.extend(out.stderr.splitlines())
    row = json.loads(out.stdout.strip().splitlines()[-1])
    return {**row, "process_wall_s": wall, "load_before": before, "load_after": loadavg(), "date": utc_now()}


def m3ae_bench(args: list[str], env: dict[str, str] | None = None, python: str = sys.executable) -> dict:
    """One `m3ae bench ... --json` process (the step of `m3ae pretrain` on a synthetic batch)."""
    return run_json([python, "-m", "m3ae.cli", "bench", *args, "--json"], env)


def append_jsonl(path: str | None, row: dict) -> None:
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def bench_config(spec: dict):
    """(BenchConfig, model config) for a model of MODELS (`spec["model"]`); the other keys of `spec`
    are BenchConfig fields (precision, attn_impl, compile, steps, warmup, threads)."""
    from m3ae import recipes
    from m3ae.config import load
    from m3ae.model import M3AEConfig
    from m3ae.train.bench import BenchConfig
    from m3ae.train.pretrain import PretrainConfig

    spec = dict(spec)
    name = spec.pop("model")
    source, image_size, text_length, vocab, batch = MODELS[name]
    kind, value = source.split(":")
    model = load(PretrainConfig, recipes.resolve(value)).model if kind == "recipe" else M3AEConfig.from_preset(value)
    spec.setdefault("steps", 20 if name == "demo" else 5)
    b = BenchConfig(batch_size=batch, image_size=image_size or model.image_size,
                    text_length=text_length or model.text_length, vocab_size=vocab or model.vocab_size, **spec)
    return b, model


def time_model(spec: dict) -> dict:
    """In this process: `m3ae bench`'s step for `bench_config(spec)`."""
    from m3ae.train.bench import run_bench

    b, model = bench_config(spec)
    row = run_bench(b, model)
    row.update(model=spec["model"], model_source=MODELS[spec["model"]][0], emb_dim=model.emb_dim, depth=model.depth,
               dec_emb_dim=model.dec_emb_dim, dec_depth=model.dec_depth, patch_size=model.patch_size)
    return row


def model_process(spec: dict, env: dict[str, str] | None = None, stderr: list[str] | None = None) -> dict:
    """`time_model(spec)` in a fresh process (its own threads, heap and caches)."""
    return run_json([sys.executable, str(Path(__file__)), json.dumps(spec)], env, stderr)


if __name__ == "__main__":
    import m3ae.cli  # noqa: F401  first: idle OpenMP threads sleep, as under `m3ae`, before torch loads

    print(json.dumps(time_model(json.loads(sys.argv[1]))))
