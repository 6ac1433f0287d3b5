"""Side by side: the official JAX/Flax M3AE training step against `m3ae bench`, on the same shapes.

The official model is imported, unmodified, from a checkout of young-geng/m3ae_public given by
--official-repo (the folder holding its `m3ae/` package); nothing of it is copied here. Its
`m3ae_main.py` builds the train step inside `main()` behind absl flags, wandb and torch imports, so
this file rebuilds that step from the official module's own functions, as `create_train_step`
does: `extract_patches`, the model's `apply` with fresh `noise` rngs, `patch_mse_loss` on the
removed patches, `cross_entropy_loss_and_accuracy` on the removed real tokens, the weighted sum,
`value_and_grad`, and `M3AETrainState.apply_gradients` through
`optax.chain(clip_by_global_norm, adamw(b1 .9, b2 .95, wd .05, the official no-decay mask))`.
One difference: `jax.jit` instead of `jax.pmap` over one device (the same XLA program without the
one-device all-reduces). The official code has no bf16 mode (fp32 only), so only fp32 is timed.

Two roles in one file:
- the orchestrator (any Python, stdlib only): alternates one process of the official step (run
  with --jax-python) and one `m3ae bench` process per precision of ours (run with --ours-python and
  PYTHONPATH=<repo>/src), round after round, so both sides see the same load; writes one JSON line
  per process with the load average before and after it.
- `--role official`: run by the orchestrator under the JAX venv; times the step, prints one JSON.

    python bench/official_jax_step.py --official-repo /tmp/m3ae_public --jax-python /tmp/jaxenv/bin/python \
        --rounds 2 --out bench/results/official_jax_step_cpu.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _process import append_jsonl, run_json

REPO = Path(__file__).resolve().parents[1]

# The official presets (model.get_transformer_by_config) that this harness and `m3ae bench` share.
OFFICIAL_PRESETS = ("small", "base", "large", "huge")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--role", choices=["orchestrate", "official"], default="orchestrate",
                   help="orchestrate: alternate both sides in subprocesses; official: time the JAX step here")
    p.add_argument("--official-repo", required=True,
                   help="checkout of young-geng/m3ae_public (the folder that holds m3ae/model.py)")
    p.add_argument("--jax-python", default=sys.executable, help="Python of a venv with jax, flax, optax, ml_collections")
    p.add_argument("--ours-python", default=sys.executable,
                   help="Python with torch for `m3ae bench` (run with PYTHONPATH=<this repo>/src)")
    p.add_argument("--preset", choices=OFFICIAL_PRESETS, default="small", help="model size, both sides")
    p.add_argument("--image-size", type=int, default=224, help="image side in pixels, both sides")
    p.add_argument("--patch-size", type=int, default=16, help="patch side (the official flag's default)")
    p.add_argument("--batch-size", type=int, default=8, help="samples per step, both sides")
    p.add_argument("--text-length", type=int, default=64, help="tokens per caption (last quarter padding), both sides")
    p.add_argument("--vocab-size", type=int, default=30522, help="text vocabulary, both sides")
    p.add_argument("--text-loss-weight", type=float, default=0.5, help="the paper's 0.5, as ours")
    p.add_argument("--steps", type=int, default=5, help="timed steps per process (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (the official side's first one compiles)")
    p.add_argument("--rounds", type=int, default=2, help="orchestrate: alternations of official and ours")
    p.add_argument("--ours-precisions", nargs="+", default=["auto", "fp32"],
                   help="orchestrate: one `m3ae bench` per precision per round (auto = default flags)")
    p.add_argument("--busy-before", type=float, default=0.0,
                   help="orchestrate: seconds of one spinning process per core before each measured process "
                        "(the issue's 'right after a busy minute'); 0: none")
    p.add_argument("--condition", default="as found",
                   help="orchestrate: label of the machine's state written with every row")
    p.add_argument("--out", type=Path, help="orchestrate: JSON lines appended here")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# The official step (runs under the JAX venv)


def time_official(a: argparse.Namespace) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import flax
    from ml_collections import ConfigDict

    sys.path.insert(0, str(Path(a.official_repo).resolve()))
    from m3ae.model import (  # the official module
        M3AETrainState, MaskedMultimodalAutoencoder, cross_entropy_loss_and_accuracy, extract_patches,
        mask_intersection, mask_not, patch_mse_loss,
    )

    patch_dim = a.patch_size * a.patch_size * 3
    model = MaskedMultimodalAutoencoder(
        config_updates=ConfigDict({"model_type": a.preset}), text_vocab_size=a.vocab_size, image_output_dim=patch_dim,
    )
    n_patches = (a.image_size // a.patch_size) ** 2
    rng = jax.random.PRNGKey(0)

    def rngs(key):
        return dict(zip(model.rng_keys(), jax.random.split(key, len(model.rng_keys()))))

    rng, init_key = jax.random.split(rng)
    params = model.init(
        rngs(init_key), jnp.zeros((2, n_patches, patch_dim), jnp.float32), jnp.zeros((2, a.text_length), jnp.int32),
        jnp.zeros((2, a.text_length)), deterministic=False,
    )
    params = flax.core.frozen_dict.unfreeze(params)

    def decay_mask(tree):  # m3ae_main.get_weight_decay_mask
        flat = flax.traverse_util.flatten_dict(flax.core.frozen_dict.unfreeze(tree))
        return flax.traverse_util.unflatten_dict(
            {k: all(part not in model.no_decay_list() for part in k) for k in flat}
        )

    lr = optax.warmup_cosine_decay_schedule(  # m3ae_main's schedule at its flag defaults, scaled by batch/256
        init_value=0.0, peak_value=1.5e-4 * a.batch_size / 256, warmup_steps=10, decay_steps=10_000, end_value=0.0,
    )
    tx = optax.chain(
        optax.clip_by_global_norm(1e9),  # the official flag default: computed every step, never clips
        optax.adamw(learning_rate=lr, weight_decay=0.05, b1=0.9, b2=0.95, mask=decay_mask),
    )
    state = M3AETrainState.create(params=params, tokenizer_params=None, apply_fn=None, tx=tx)

    # The same synthetic batch as ours (train/synthetic.py): pixels N(0, 1), uniform ids, last quarter padded.
    g = np.random.default_rng(0)
    pad = np.zeros((a.batch_size, a.text_length), np.float32)
    pad[:, a.text_length - a.text_length // 4:] = 1.0  # official convention: 1.0 = padding
    batch = {
        "image": jnp.asarray(g.standard_normal((a.batch_size, a.image_size, a.image_size, 3), np.float32)),
        "text": jnp.asarray(g.integers(0, a.vocab_size, (a.batch_size, a.text_length), dtype=np.int32)),
        "text_padding_mask": jnp.asarray(pad),
    }

    def train_step(state, key, batch):  # the body of m3ae_main.create_train_step's train_step_fn
        key, step_key = jax.random.split(key)
        pad = batch["text_padding_mask"]

        def loss_fn(params):
            patches = extract_patches(batch["image"], a.patch_size)
            image_output, text_output, image_mask, text_mask = model.apply(
                params, patches, batch["text"], pad, deterministic=False, rngs=rngs(step_key),
            )
            image_loss = patch_mse_loss(image_output, patches, image_mask)
            text_loss, text_accuracy = cross_entropy_loss_and_accuracy(
                text_output, batch["text"], mask_intersection(text_mask, mask_not(pad)),
            )
            return 1.0 * image_loss + a.text_loss_weight * text_loss, (image_loss, text_loss)

        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return state.apply_gradients(grads=grads), loss, key

    step = jax.jit(train_step, donate_argnums=(0,))
    times = []
    for i in range(a.warmup + a.steps):
        start = time.perf_counter()
        state, loss, rng = step(state, rng, batch)
        loss.block_until_ready()
        times.append(time.perf_counter() - start)
    timed = times[a.warmup:]
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
    return {
        "side": "official", "precision": "fp32", "preset": a.preset, "image_size": a.image_size,
        "batch_size": a.batch_size, "text_length": a.text_length, "vocab_size": a.vocab_size,
        "step_s": sorted(timed)[len(timed) // 2], "step_s_min": min(timed), "step_times": timed,
        "first_step_s": times[0], "loss": float(loss), "params": int(n_params),
        "jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
        "devices": [str(d) for d in jax.devices()], "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


# ---------------------------------------------------------------------------------------------
# The orchestrator (stdlib only)


def _busy(seconds: float) -> None:
    """One spinning process per core for `seconds`: the load a user's previous job leaves behind."""
    code = f"import time\nend = time.time() + {seconds}\nwhile time.time() < end: pass"
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(os.cpu_count() or 1)]
    for proc in procs:
        proc.wait()


def _official_cmd(a: argparse.Namespace) -> list[str]:
    return [a.jax_python, str(Path(__file__).resolve()), "--role", "official", "--official-repo", a.official_repo,
            "--preset", a.preset, "--image-size", str(a.image_size), "--patch-size", str(a.patch_size),
            "--batch-size", str(a.batch_size), "--text-length", str(a.text_length), "--vocab-size", str(a.vocab_size),
            "--text-loss-weight", str(a.text_loss_weight), "--steps", str(a.steps), "--warmup", str(a.warmup)]


def _ours_cmd(a: argparse.Namespace, precision: str) -> list[str]:
    cmd = [a.ours_python, "-m", "m3ae.cli", "bench", "--preset", a.preset, "--image-size", str(a.image_size),
           "--batch-size", str(a.batch_size), "--text-length", str(a.text_length), "--vocab-size", str(a.vocab_size),
           "--steps", str(a.steps), "--warmup", str(a.warmup), "--json"]
    return cmd if precision == "auto" else cmd + ["--precision", precision]


def orchestrate(a: argparse.Namespace) -> None:
    ours_env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    sides = [("official", "fp32")] + [("ours", p) for p in a.ours_precisions]
    for rnd in range(a.rounds):
        # Alternate which side goes first, so neither always inherits the other's after-load.
        for side, precision in (sides if rnd % 2 == 0 else sides[::-1]):
            if a.busy_before > 0:
                _busy(a.busy_before)
            cmd = _official_cmd(a) if side == "official" else _ours_cmd(a, precision)
            row = run_json(cmd, dict(os.environ) if side == "official" else ours_env)
            row.update(side=side, flags=precision if side == "ours" else "fp32 (official: fp32 only)", round=rnd,
                       condition=a.condition, busy_before_s=a.busy_before, commit=commit)
            print(f"round {rnd} {side:8s} {row['flags']:28s} step {row['step_s']:.3f} s  "
                  f"load {row['load_before']} -> {row['load_after']}", flush=True)
            append_jsonl(a.out, row)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    if a.role == "official":
        print(json.dumps(time_official(a)))
    else:
        orchestrate(a)


if __name__ == "__main__":
    main()
