"""`lmforge model-info`: parameters by part, training memory and FLOPs per token."""

from __future__ import annotations

import argparse

from lmforge.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="PRESET_OR_CONFIG",
                   help="a preset name (tiny, seed-59m, trm-23m, trm-51m, gpt2-124m) or a YAML "
                   "config")  # fmt: skip
    p.add_argument("--batch", type=int, default=32, help="micro-batch size for the memory estimate")
    p.add_argument(
        "--context",
        type=int,
        default=None,
        help="sequence length for memory and FLOPs (default: the model's context)",
    )
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="bf16",
                   help="activation precision for the memory estimate")  # fmt: skip
    p.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="vocabulary size (default: the config's, 50,257 for presets)",
    )


def run(args: argparse.Namespace) -> int:
    from lmforge.config import model_config

    if args.batch <= 0:
        raise UserError(f"--batch must be positive (got {args.batch})")
    if args.vocab_size is not None and args.vocab_size <= 0:
        raise UserError(f"--vocab-size must be positive (got {args.vocab_size})")
    overrides = {"vocab_size": args.vocab_size} if args.vocab_size else {}
    cfg = model_config(args.model, **overrides)
    context = cfg.context if args.context is None else args.context
    if context <= 0 or context > cfg.max_context:
        raise UserError(f"--context {context} is outside 1..{cfg.max_context} for this model")
    from lmforge.info import model_info_text  # torch: imported once the arguments are good

    print(model_info_text(args.model, cfg, args.batch, context, args.dtype))
    return 0
