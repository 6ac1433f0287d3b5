"""Figure commands: `m3ae report` (and, with the data pipeline, reconstruct / attention / tsne)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    report = subparsers.add_parser("report", help="one self-contained HTML page for a run directory")
    report.add_argument("run_dir")
    report.add_argument("--out", help="output path (default RUN_DIR/report.html)")
    report.set_defaults(func=run_report)


def run_report(args: argparse.Namespace) -> int:
    from .report import build_report

    print(f"report: {build_report(args.run_dir, args.out)}")
    return 0
