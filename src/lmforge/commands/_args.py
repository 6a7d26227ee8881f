"""What several commands share: the parser classes and the checkpoint, device, sampling and
config arguments."""

from __future__ import annotations

import argparse

from lmforge.config import MAX_SEED
from lmforge.errors import UserError


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (and exit 2) like every other user error."""

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message} (see {self.prog} --help)")


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default, unless its help text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "default" not in text
            and action.default not in (None, argparse.SUPPRESS, False)
            and action.option_strings
        ):
            text += " (default: %(default)s)"
        return text


def add_checkpoint(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "checkpoint",
        metavar="CKPT_OR_RUN",
        help="checkpoint file, or run folder (its best.pt, else final_model.pt, else newest step; "
        "one that fails verification is skipped with a notice)",
    )


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")


def add_sampling(p: argparse.ArgumentParser, max_new_tokens: int, temperature: float) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                   help="tokens to generate at most")  # fmt: skip
    p.add_argument("--temperature", type=float, default=temperature,
                   help="sampling temperature (0 = greedy)")  # fmt: skip
    p.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="divide the logits of tokens already present (1 = off)")  # fmt: skip
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="sampling seed; sample or answer n uses seed + n (default: random)",
    )


def sampling_from(args: argparse.Namespace):
    """The checked `Sampling` of generate/chat (checked before torch is imported: a typo costs
    no seconds)."""
    positive("--max-new-tokens", args.max_new_tokens)
    positive("--temperature", args.temperature, allow_zero=True)
    positive("--top-k", args.top_k, allow_zero=True)
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1] (got {args.top_p})")
    positive("--repetition-penalty", args.repetition_penalty)
    if args.seed is not None and not 0 <= args.seed <= MAX_SEED:
        raise UserError(f"--seed must be a whole number from 0 to 2**62 (got {args.seed})")
    from lmforge.generate import Sampling

    return Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                    args.repetition_penalty, args.seed)  # fmt: skip


def positive(name: str, value: float, allow_zero: bool = False) -> None:
    import math

    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise UserError(f"{name} must be {'>= 0' if allow_zero else 'positive'} (got {value})")


def add_config(p: argparse.ArgumentParser) -> None:
    """train / sft: a YAML config and --section.key=VALUE overrides of any key."""
    from lmforge.config import config_help

    p.add_argument("config", nargs="?", metavar="CONFIG.yaml",
                   help="YAML config (see configs/); the keys below override it")  # fmt: skip
    p.epilog = (
        "config keys (override any as --section.key=VALUE; YAML numbers like 3e-4 work):\n"
        + config_help()
    )
    p.set_defaults(accepts_overrides=True)


def config_from(args: argparse.Namespace):
    from lmforge.config import load_config

    return load_config(args.config, args.overrides)
