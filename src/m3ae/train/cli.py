"""`m3ae pretrain` and `m3ae bench`. Handlers import torch and the model lazily."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .. import recipes

def register(subparsers) -> None:
    from ..config import add_config_arguments, add_override_arguments
    from .bench import BenchConfig
    from .pretrain import PretrainConfig

    p = subparsers.add_parser(
        "pretrain", help="pretrain M3AE / MAE (single process, or under torchrun)",
        description="Pretrain from a YAML recipe with dotted overrides, e.g. "
        "`m3ae pretrain --config cc12m_m3ae --model.preset base --optim.base-lr 1.5e-4`. "
        "With no arguments: the tiny model on the embedded dataset, on CPU, in a few minutes.",
    )
    p.add_argument("--config", help="a packaged recipe's name (see --list-recipes) or a YAML path (default: tiny; "
                   "when resuming: the run's own config.yaml)")
    p.add_argument("--list-recipes", action="store_true", help="list the packaged recipes and exit")
    p.add_argument("--max-steps", type=int, help="stop after this step; resume later (train.max_steps). When "
                   "resuming: the new stopping point, past the schedule's end it stretches the schedule")
    p.add_argument("--resume", help="'auto': continue the run in --out-dir from its newest good checkpoint, or start "
                   "it; 'latest': the same, but the checkpoint must exist; or a checkpoint directory. The run's "
                   "config.yaml is reloaded and only the flags given now apply")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config as YAML (readable by --config) and exit")
    add_override_arguments(p, PretrainConfig)
    p.set_defaults(func=pretrain_command)

    b = subparsers.add_parser("bench", help="training-step throughput (samples/s, FLOP/s, MFU)",
                              description="Times training steps of a randomly initialised model on random data.")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    add_config_arguments(b, BenchConfig)
    b.set_defaults(func=bench_command)


# What a resumed run may not change: its parameters' shapes, and which samples it reads in which order.
FROZEN_ON_RESUME = ("model.", "data.", "train.batch_size", "train.micro_batch_size", "train.seed")


def build_config(args: argparse.Namespace):
    from .. import config as config_io
    from .pretrain import PretrainConfig

    overrides = config_io.collect_overrides(args)
    if args.max_steps is not None:
        overrides["train.max_steps"] = args.max_steps
    saved = saved_run_config(args, overrides.get("out_dir"))
    if saved is not None:
        return resumed_config(saved, overrides, args.config)
    return config_io.load(PretrainConfig, recipes.resolve(args.config or recipes.DEFAULT), overrides)


def saved_run_config(args: argparse.Namespace, out_dir: str | None) -> Path | None:
    """The config.yaml of the run that --resume continues, if it was written."""
    from ..config import ConfigError

    if not args.resume:
        return None
    if args.resume in ("auto", "latest"):
        if out_dir is None:
            raise ConfigError(f"--resume {args.resume}: needs --out-dir, the run to continue")
        run_dir = Path(out_dir)
        if args.resume == "latest" and not any((run_dir / "checkpoints").glob("step_*")):
            raise ConfigError(f"--resume latest: no checkpoint in {run_dir / 'checkpoints'}")
    else:
        checkpoint = Path(args.resume)
        if not checkpoint.is_dir():
            raise ConfigError(f"--resume {args.resume}: no such checkpoint directory")
        run_dir = checkpoint.parent.parent  # <run>/checkpoints/step_N
    path = run_dir / "config.yaml"
    return path if path.is_file() else None


def resumed_config(saved: Path, overrides: dict, recipe: str | None):
    """The saved run's config with only the flags given now applied. `max_steps` was where the last
    invocation stopped, so it is dropped unless given again; past the schedule's end it becomes the end."""
    from .. import config as config_io
    from ..config import ConfigError
    from .pretrain import PretrainConfig

    if recipe is not None:
        raise ConfigError(f"--config {recipe}: a resumed run keeps its own config ({saved}); give single flags instead")
    before = config_io.load(PretrainConfig, saved)
    overrides = {"train.max_steps": None, **overrides}
    max_steps = overrides["train.max_steps"]
    if max_steps is not None and max_steps > overrides.get("train.total_steps", before.train.total_steps):
        overrides["train.total_steps"] = max_steps
        print(f"m3ae pretrain: --max-steps {max_steps} is past the schedule's end "
              f"({before.train.total_steps}): the lr schedule now ends at step {max_steps}", file=sys.stderr)
    after = config_io.load(PretrainConfig, saved, overrides)
    old, new = config_io.flatten(config_io.to_dict(before)), config_io.flatten(config_io.to_dict(after))
    for key in sorted(old.keys() | new.keys()):
        if key.startswith(FROZEN_ON_RESUME) and old.get(key) != new.get(key):
            raise ConfigError(f"--{key}: {old.get(key)!r} -> {new.get(key)!r} would change the shapes or the data "
                              f"order of the run being resumed ({saved}); start a new --out-dir instead")
    return after


def pretrain_command(args: argparse.Namespace) -> int:
    from .. import config as config_io
    from ..config import ConfigError

    if args.list_recipes:
        for name in recipes.names():
            print(f"{name}\t{recipes.DIRECTORY / (name + '.yaml')}")
        return 0
    try:
        cfg = build_config(args)
    except ConfigError as e:
        print(f"m3ae pretrain: config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(config_io.to_yaml(cfg), end="")
        return 0
    from ..engine.run_dir import RunDirBusy
    from ..utils import DiskFullError
    from .pretrain import NonFiniteLossError, run_pretraining

    try:
        result = run_pretraining(cfg, resume="auto" if args.resume == "latest" else args.resume)
    except ConfigError as e:
        print(f"m3ae pretrain: config error: {e}", file=sys.stderr)
        return 2
    except (NonFiniteLossError, DiskFullError, RunDirBusy) as e:
        print(f"m3ae pretrain: stopped: {e}", file=sys.stderr)
        return 1
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
            f"{result['preset']} {result['image_size']}px batch {result['batch_size']} {result['dtype']}: "
            f"{result['step_s']:.3f} s/step, {result['samples_per_s']:.2f} samples/s, "
            f"{result['flops_per_s'] / 1e12:.3f} TFLOP/s of {result['peak_flops_per_s'] / 1e12:.3f} peak "
            f"(MFU {100 * result['mfu']:.1f}%)\n"
            f"  {result['dtype']}: {result['precision_reason']}; threads {result['threads']}: {result['threads_reason']}"
        )
    return 0
