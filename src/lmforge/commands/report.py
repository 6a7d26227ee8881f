"""`lmforge report RUN_DIR_OR_LOG`: dashboard PNG, text summary and JSON of a run or a log."""

from __future__ import annotations

import argparse


# Each help states its default itself; "%(default).0s" prints nothing but stops argparse's
# ArgumentDefaultsHelpFormatter from appending a second, less useful "(default: None)".
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "path",
        metavar="RUN_DIR_OR_LOG",
        help="run folder or log: lmforge "
        "CSV/JSONL, nanoGPT stdout, or CSV/JSONL with a step column",
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        help="output folder (default: RUN/training_plots/"
        ", or training_plots/ beside the log)%(default).0s",
    )
    parser.add_argument(
        "--floor",
        type=float,
        metavar="NATS",
        help="entropy floor to draw, nats/"
        "token (default: run_info.json's entropy_floor, else none)%(default).0s",
    )


def run(args: argparse.Namespace) -> int:
    from lmforge.monitor.logparse import load_metrics
    from lmforge.monitor.report import write_table_report

    table = load_metrics(args.path)
    if args.floor is not None:
        table.info["entropy_floor"] = args.floor
    print(f"Read {table.source} as format: {table.format}")
    paths = write_table_report(table, args.out)
    print(paths["summary"].read_text(encoding="utf-8"))
    for path in paths.values():
        print(f"wrote {path}")
    return 0
