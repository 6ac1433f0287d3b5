"""The `m3ae` command line: one sub-command per capability, each registered by its own module."""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import sys

from . import __version__
from .utils import RunStopped

# Idle OpenMP threads sleep instead of spinning, unless the user chose (OMP_WAIT_POLICY, or libgomp's
# GOMP_SPINCOUNT; torch's CPU wheels ship GNU libgomp, which ignores Intel's KMP_BLOCKTIME). A
# spinning thread keeps its core busy between parallel regions: on a machine with other jobs it
# takes the time slice the straggler of the team needs: 2 threads ran 6-10x slower than 1 on a
# loaded 2-core machine, and with sleeping threads faster than 1 in 3 of 4 runs (docs/BENCHMARKS.md).
# Set here, before any command imports torch: the runtime reads it once, when torch loads it.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

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
        sub.allow_abbrev = False  # a typo (`--imag` for `--image`) is an error, not another flag
    return parser


def _subparsers(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield sub
                yield from _subparsers(sub)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        _reject_unknown(parser, args.command_path, unknown)
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as e:
        if os.environ.get("M3AE_DEBUG") == "1":
            raise
        from .config import ConfigError

        kind = "config error" if isinstance(e, ConfigError) else "error"
        print(f"{args.command_path}: {kind}: {one_line(e)} (M3AE_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2
    except RunStopped as e:
        print(f"{args.command_path}: stopped: {one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{args.command_path}: interrupted", file=sys.stderr)
        return 130


def _reject_unknown(parser: argparse.ArgumentParser, command_path: str, unknown: list[str]) -> None:
    """argparse leaves a command's unknown flags to the top parser, whose error names only `m3ae`: this
    one names the command and the nearest flag it has."""
    command = next(sub for sub in _subparsers(parser) if sub.prog == command_path)
    listed = {a.dest: a.option_strings[-1] for a in command._actions if a.option_strings and a.help != argparse.SUPPRESS}
    # every accepted spelling (hidden aliases too: `--train.batch-sise` is nearest `--train.batch-size`)
    # -> the one --help lists (`--batch-size`)
    spellings = {flag: listed[a.dest] for a in command._actions if a.dest in listed for flag in a.option_strings}
    flags = list(listed.values())
    given = unknown[0].split("=", 1)[0]
    near = ([flag for flag in flags if flag.startswith(f"{given}.")][:1]
            or [spellings[flag] for flag in difflib.get_close_matches(given, list(spellings), n=1)])
    if not given.startswith("-") and "--checkpoint" in flags:  # the model was once given positionally
        near = [f"--checkpoint {given}"]
    hint = f" (did you mean {near[0]}?)" if near else f" (see {command_path} --help)"
    command.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")


def one_line(error: BaseException) -> str:
    if isinstance(error, ModuleNotFoundError) and error.name:
        return f"the optional package {error.name!r} is not installed"
    text = " ".join(str(error).split()) or type(error).__name__
    return text if isinstance(error, USER_ERRORS) else f"{type(error).__name__}: {text}"


if __name__ == "__main__":
    sys.exit(main())
