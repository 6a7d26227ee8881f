"""`lmforge compare RUN_DIR_OR_LOG...`: overlay the loss curves of several runs."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "paths",
        nargs="+",
        metavar="RUN_DIR_OR_LOG",
        help="runs or logs to overlay, in any format `report` reads",
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        default=".",
        help="folder for compare_YYYYMMDD_HHMMSS.png (default: %(default)s)",
    )


def run(args: argparse.Namespace) -> int:
    from lmforge.monitor.logparse import load_metrics
    from lmforge.monitor.report import compare_runs

    for path in args.paths:
        print(f"Read {path} as format: {load_metrics(path).format}")
    print(f"wrote {compare_runs(args.paths, args.out)}")
    return 0
