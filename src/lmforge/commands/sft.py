"""`lmforge sft [CONFIG.yaml] --init-from CKPT_OR_RUN [--section.key=VALUE ...]`: phase 2."""

from __future__ import annotations

import argparse

from lmforge.commands._args import add_config, config_from


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config(p)
    p.add_argument("--init-from", default=None, metavar="CKPT_OR_RUN",
                   help="phase-1 checkpoint or run folder to start from (weights only; the same "
                   "as --train.init_from)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    cfg = config_from(args)  # a bad config fails here, before torch is imported (seconds)
    if args.init_from:
        cfg.train.init_from = args.init_from
    from lmforge.train.pipeline import finetune

    return finetune(cfg)
