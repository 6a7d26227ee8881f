"""`lmforge env`: versions, device, precision, threads, the CPU's measured matmul peak."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--remeasure",
        action="store_true",
        help="measure the CPU's matmul peak again instead of reading the cached value",
    )


def run(args: argparse.Namespace) -> int:
    from lmforge.device import environment

    for key, value in environment(remeasure=args.remeasure).items():
        print(f"{key:<16} {value}")
    return 0
