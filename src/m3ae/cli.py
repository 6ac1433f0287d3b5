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
    args = build_parser().parse_args(argv)
    if getattr(args, "threads", None) is not None:  # commands configured by flags; configs apply their own
        from .train.precision import apply_threads

        print(apply_threads(args.threads).describe(), file=sys.stderr)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
