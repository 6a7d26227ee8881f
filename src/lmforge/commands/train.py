"""`lmforge train [CONFIG.yaml] [--section.key=VALUE ...]`: phase 1, pretraining."""

from __future__ import annotations

import argparse

from lmforge.commands._args import add_config, config_from


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config(p)


def run(args: argparse.Namespace) -> int:
    cfg = config_from(args)  # a bad config fails here, before torch is imported (seconds)
    from lmforge.train.pipeline import pretrain

    return pretrain(cfg)
