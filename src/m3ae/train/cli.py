"""`m3ae pretrain` and `m3ae bench`. Handlers import torch and the model lazily."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

DEFAULT_RECIPE = "tiny"
# Recipes live in the repository's configs/ directory; a name resolves there, a path as given.
REPO_CONFIGS = Path(__file__).resolve().parents[3] / "configs"


def resolve_recipe(name: str) -> Path:
    from ..config import ConfigError

    candidates = [Path(name), Path("configs") / f"{name}.yaml", REPO_CONFIGS / f"{name}.yaml"]
    for path in candidates:
        if path.is_file():
            return path
    known = sorted(p.stem for p in REPO_CONFIGS.glob("*.yaml")) if REPO_CONFIGS.is_dir() else []
    raise ConfigError(f"--config {name!r}: no such file or recipe (recipes: {', '.join(known) or 'none found'})")


def register(subparsers) -> None:
    from ..config import add_override_arguments
    from .pretrain import PretrainConfig

    p = subparsers.add_parser(
        "pretrain", help="pretrain M3AE / MAE (single process, or under torchrun)",
        description="Pretrain from a YAML recipe with dotted overrides, e.g. "
        "`m3ae pretrain --config cc12m_m3ae --model.preset base --optim.base_lr 1.5e-4`. "
        "With no arguments: the tiny model on the embedded dataset, on CPU, in a few minutes.",
    )
    p.add_argument("--config", default=DEFAULT_RECIPE, help="recipe name in configs/ or a YAML path (default: tiny)")
    p.add_argument("--out-dir", help="run directory (default: runs/<preset>-<date-time>); same as --out_dir")
    p.add_argument("--max-steps", type=int, help="stop after this step; resume later (train.max_steps)")
    p.add_argument("--resume", help="'auto': the latest good checkpoint in --out-dir, if any; or a checkpoint directory")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    add_override_arguments(p, PretrainConfig)
    p.set_defaults(func=pretrain_command)

    from .bench import BenchConfig
    from .precision import parse_threads

    b = subparsers.add_parser("bench", help="training-step throughput (samples/s, FLOP/s, MFU)")
    for f in dataclasses.fields(BenchConfig):
        flag = f"--{f.name.replace('_', '-')}"
        if f.type in ("bool", bool):
            b.add_argument(flag, action="store_true", default=f.default)
        else:
            kind = {"int": int, "float": float, "ThreadsSetting": parse_threads}.get(str(f.type), str)
            choices = {"dtype": ["auto", "fp32", "bf16", "fp16"], "attn_impl": ["auto", "sdpa", "math"],
                       "model_type": ["m3ae", "mae"]}.get(f.name)
            b.add_argument(flag, type=kind, default=f.default, choices=choices)
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.set_defaults(func=bench_command)


def build_config(args: argparse.Namespace):
    from .. import config as config_io
    from .pretrain import PretrainConfig

    overrides = config_io.collect_overrides(args)
    if args.out_dir is not None:
        overrides["out_dir"] = args.out_dir
    if args.max_steps is not None:
        overrides["train.max_steps"] = args.max_steps
    return config_io.load(PretrainConfig, resolve_recipe(args.config), overrides)


def pretrain_command(args: argparse.Namespace) -> int:
    from .. import config as config_io
    from ..config import ConfigError

    try:
        cfg = build_config(args)
        if args.resume == "auto" and cfg.out_dir is None:
            raise ConfigError("--resume auto: needs --out-dir, the run to continue")
    except ConfigError as e:
        print(f"m3ae pretrain: config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(config_io.to_dict(cfg), indent=2))
        return 0
    from .pretrain import NonFiniteLossError, run_pretraining

    try:
        result = run_pretraining(cfg, resume=args.resume)
    except NonFiniteLossError as e:
        print(f"m3ae pretrain: stopped: {e}", file=sys.stderr)
        return 1
    if result is not None:
        print(result.describe())
    return 0


def bench_command(args: argparse.Namespace) -> int:
    from .bench import BenchConfig, run_bench

    cfg = BenchConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BenchConfig)})
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
