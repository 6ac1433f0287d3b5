"""`m3ae pretrain` and `m3ae bench`. Handlers import torch and the model lazily."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .. import recipes

def register(subparsers) -> None:
    from ..config import add_config_arguments
    from .bench import BenchConfig
    from .pretrain import PretrainConfig

    p = subparsers.add_parser(
        "pretrain", help="pretrain M3AE / MAE (single process, or under torchrun)",
        description="Pretrain from a YAML recipe with dotted overrides, e.g. "
        "`m3ae pretrain --config cc12m_m3ae --preset base --optim.base-lr 1.5e-4`. "
        "With no arguments: the tiny model on the embedded dataset, on CPU, in a few minutes.",
    )
    add_config_arguments(p, PretrainConfig, config_help=(
        f"a packaged recipe ({', '.join(recipes.names())}) or a YAML file of config fields; flags apply on top "
        f"(default: {recipes.DEFAULT}; when resuming: the run's own config.yaml)"))
    p.set_defaults(func=pretrain_command)

    b = subparsers.add_parser("bench", help="training-step throughput (samples/s, FLOP/s, MFU)",
                              description="Times the training step that pretraining runs (the engine's step, "
                              "the pretraining losses) on a randomly initialised model and a synthetic batch.")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    add_config_arguments(b, BenchConfig)
    b.set_defaults(func=bench_command)


# What a resumed run may not change: its parameters' shapes, and which samples it reads in which order.
FROZEN_ON_RESUME = ("model.", "data.", "train.batch_size", "train.micro_batch_size", "train.seed")


def build_config(args: argparse.Namespace):
    from .. import config as config_io
    from .pretrain import PretrainConfig

    overrides = config_io.collect_overrides(args)
    resume = overrides.get("resume")
    run_dir = resumed_run(resume, overrides.get("out_dir"))
    if run_dir is not None and run_dir.config.is_file():
        return resumed_config(run_dir, overrides, args.config)
    return config_io.load(PretrainConfig, recipes.resolve(args.config or recipes.DEFAULT), overrides)


def resumed_run(resume: str | None, out_dir: str | None):
    """The run that --resume continues (None for a fresh run)."""
    from ..config import ConfigError
    from ..engine.run_dir import RunDir

    if not resume:
        return None
    if resume in ("auto", "latest"):
        if out_dir is None:
            raise ConfigError(f"--resume {resume}: needs --out-dir, the run to continue")
        run_dir = RunDir(out_dir)
        if resume == "latest" and not run_dir.step_dirs():
            raise ConfigError(f"--resume latest: no checkpoint in {run_dir.checkpoints}")
        return run_dir
    checkpoint = Path(resume)
    run_dir = RunDir.containing(checkpoint)
    if not checkpoint.is_dir() or run_dir is None:
        raise ConfigError(f"--resume {resume}: not a checkpoint directory of a run (<run>/checkpoints/step_N)")
    return run_dir


def resumed_config(run_dir, overrides: dict, recipe: str | None):
    """The saved run's config with only the flags given now applied. `max_steps` was where the last
    invocation stopped, so it is dropped unless given again; past the schedule's end it becomes the end."""
    from ..config import ConfigError
    from ..data.config import refuse_stored_commands
    from .pretrain import PretrainConfig

    if recipe is not None:
        raise ConfigError(f"--config {recipe}: a resumed run keeps its own config ({run_dir.config}); give single "
                          f"flags instead")
    saved = run_dir.read_config()
    overrides = {"train.max_steps": None, **overrides}
    max_steps = overrides["train.max_steps"]
    total = overrides.get("train.total_steps", (saved.get("train") or {}).get("total_steps"))
    if max_steps is not None and total is not None and max_steps > total:
        overrides["train.total_steps"] = max_steps
        print(f"m3ae pretrain: --max-steps {max_steps} is past the schedule's end ({total}): the lr schedule now "
              f"ends at step {max_steps}", file=sys.stderr)
    cfg = run_dir.load_config(PretrainConfig, overrides, FROZEN_ON_RESUME)
    refuse_stored_commands(cfg.data, str(run_dir.config), typed=overrides)
    return cfg


def pretrain_command(args: argparse.Namespace) -> int:
    from .. import config as config_io
    from .pretrain import run_pretraining

    cfg = build_config(args)
    if args.print_config:
        print(config_io.to_yaml(cfg), end="")
        return 0
    result = run_pretraining(cfg)
    if result is not None:
        print(result.describe())
    return 0


def bench_command(args: argparse.Namespace) -> int:
    from ..config import command_config
    from .bench import BenchConfig, run_bench

    cfg = command_config(args, BenchConfig)
    if cfg is None:
        return 0
    result = run_bench(cfg)
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{result['preset']} {result['image_size']}px batch {result['batch_size']} {result['precision']}: "
            f"{result['step_s']:.3f} s/step, {result['samples_per_s']:.2f} samples/s, "
            f"{result['flops_per_s'] / 1e12:.3f} TFLOP/s of {result['peak_flops_per_s'] / 1e12:.3f} peak "
            f"(MFU {100 * result['mfu']:.1f}%)\n"
            f"  {result['precision']}: {result['precision_reason']}; threads {result['threads']}: {result['threads_reason']}"
        )
    return 0
