"""The `m3ae` command line: one sub-command per capability, each registered by its own module."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from . import __version__

# Each module exposes `register(subparsers)`; handlers import heavy dependencies lazily so that
# `m3ae --help` stays fast.
COMMAND_MODULES = [
    "m3ae.interop.cli",
    "m3ae.data.cli",
    "m3ae.train.cli",
    "m3ae.viz.cli",
    "m3ae.eval.cli",
]
# What a user's input can cause (a bad value, a missing file or package, a full disk): reported in one
# line with exit status 2. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError, ImportError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="m3ae", description=__doc__)
    parser.add_argument("--version", action="version", version=f"m3ae {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    for sub in _subparsers(parser):  # error lines name the whole command ("m3ae data build")
        sub.set_defaults(command_path=sub.prog)
    return parser


def _subparsers(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield sub
                yield from _subparsers(sub)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "threads", None) is not None:  # commands configured by flags; configs apply their own
        from .engine.runtime import apply_threads

        print(apply_threads(args.threads).describe(), file=sys.stderr)
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as e:
        if os.environ.get("M3AE_DEBUG") == "1":
            raise
        from .model.config import ConfigError

        kind = "config error" if isinstance(e, ConfigError) else "error"
        print(f"{args.command_path}: {kind}: {one_line(e)} (M3AE_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{args.command_path}: interrupted", file=sys.stderr)
        return 130


def one_line(error: BaseException) -> str:
    if isinstance(error, ModuleNotFoundError) and error.name:
        return f"the optional package {error.name!r} is not installed"
    text = " ".join(str(error).split()) or type(error).__name__
    return text if isinstance(error, USER_ERRORS) else f"{type(error).__name__}: {text}"


if __name__ == "__main__":
    sys.exit(main())
