"""The `m3ae` command line: one sub-command per capability, each registered by its own module."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module exposes `register(subparsers)`; handlers import heavy dependencies lazily so that
# `m3ae --help` stays fast.
COMMAND_MODULES = [
    "m3ae.interop.cli",
    "m3ae.data.cli",
    "m3ae.train.cli",
    "m3ae.viz.cli",
    "m3ae.eval.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="m3ae", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .model.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as error:  # a user's setting (recipe, flag, config.json): one line, no traceback
        print(f"m3ae {args.command}: config error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
