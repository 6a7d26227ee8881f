"""The `lmforge` command: one subcommand per stage, each a thin layer over the Python API.

User mistakes raise `UserError`; here they become one line on stderr and exit status 2.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from lmforge import __version__
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


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    from lmforge.config import config_help

    p.add_argument(
        "config",
        nargs="?",
        metavar="CONFIG.yaml",
        help="YAML config (see configs/); the keys below override it",
    )
    p.epilog = (
        "config keys (override any as --section.key=VALUE; YAML numbers like 3e-4 work):\n"
        + config_help()
    )
    p.set_defaults(accepts_overrides=True)


def add_sft_arguments(p: argparse.ArgumentParser) -> None:
    add_train_arguments(p)
    p.add_argument(
        "--init-from",
        default=None,
        metavar="CKPT_OR_RUN",
        help="phase-1 checkpoint or run folder to start from (weights only)",
    )


def cmd_env(args: argparse.Namespace) -> int:
    from lmforge.device import environment

    for key, value in environment().items():
        print(f"{key:<16} {value}")
    return 0


def add_model_info(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        metavar="PRESET_OR_CONFIG",
        help="a preset name (tiny, seed-59m, trm-23m, trm-51m, gpt2-124m) or a YAML config",
    )
    p.add_argument("--batch", type=int, default=32, help="micro-batch size for the memory estimate")
    p.add_argument(
        "--context",
        type=int,
        default=None,
        help="sequence length for memory and FLOPs (default: the model's context)",
    )
    p.add_argument(
        "--dtype",
        choices=("fp32", "bf16", "fp16"),
        default="bf16",
        help="activation precision for the memory estimate",
    )
    p.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="vocabulary size (default: the config's, 50,257 for presets)",
    )


def cmd_model_info(args: argparse.Namespace) -> int:
    from lmforge.config import model_config
    from lmforge.info import model_info_text

    overrides = {"vocab_size": args.vocab_size} if args.vocab_size else {}
    cfg = model_config(args.model, **overrides)
    if args.batch <= 0:
        raise UserError(f"--batch must be positive (got {args.batch})")
    context = args.context or cfg.context
    if context <= 0 or context > cfg.max_context:
        raise UserError(f"--context {context} is outside 1..{cfg.max_context} for this model")
    print(model_info_text(args.model, cfg, args.batch, context, args.dtype))
    return 0


def _from(module: str, func: str) -> Callable:
    """A function of a subcommand's module, imported only when used: building the parser of
    `lmforge prepare` must not import torch, matplotlib or transformers."""

    def call(*args):
        import importlib

        return getattr(importlib.import_module(module), func)(*args)

    return call


# name, help, arguments adder, runner
COMMANDS: list[tuple[str, str, Callable, Callable]] = [
    ("env", "print torch version, device, threads, compile and flash-attention availability",
     lambda p: None, cmd_env),
    ("model-info", "parameters by part, training memory and FLOPs per token of a model",
     add_model_info, cmd_model_info),
    ("prepare", "turn text into token files (train.bin, val.bin, meta.json)",
     _from("lmforge.data.prepare", "add_prepare_arguments"),
     _from("lmforge.data.prepare", "run_prepare")),
    ("train", "pretrain a model (phase 1) on prepared data",
     add_train_arguments, _from("lmforge.train.cli", "run_train")),
    ("sft", "instruction-tune a pretrained model (phase 2)",
     add_sft_arguments, _from("lmforge.train.cli", "run_sft")),
    ("generate", "sample text from a checkpoint, streamed (phase 1 or SFT)",
     _from("lmforge.generate", "add_generate_arguments"),
     _from("lmforge.generate", "run_generate")),
    ("chat", "talk to an instruction-tuned checkpoint (multi-turn, streaming)",
     _from("lmforge.generate", "add_chat_arguments"), _from("lmforge.generate", "run_chat")),
    ("eval", "loss/perplexity on prepared data; EM/F1/accuracy on Q&A data",
     _from("lmforge.eval_cli", "add_eval_arguments"), _from("lmforge.eval_cli", "run_eval")),
    ("export", "export a checkpoint to Hugging Face (transformers) or GGUF (llama.cpp)",
     _from("lmforge.export", "add_export_arguments"), _from("lmforge.export", "run_export")),
    ("report", "plots and a text summary of a run or a training log",
     _from("lmforge.monitor.report", "add_report_arguments"),
     _from("lmforge.monitor.report", "run_report")),
    ("compare", "overlay the loss curves of several runs",
     _from("lmforge.monitor.report", "add_compare_arguments"),
     _from("lmforge.monitor.report", "run_compare")),
]  # fmt: skip


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s options are built (None: all, e.g. for docs and tests)."""
    parser = Parser(
        prog="lmforge",
        formatter_class=Formatter,
        description="Train small GPT/Llama-style language models from scratch: "
        "prepare -> train -> sft -> report / generate / chat / eval / export.",
    )
    parser.add_argument("--version", action="version", version=f"lmforge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name, help_text, add_arguments, run in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=Formatter)
        if command is None or command == name:
            add_arguments(p)
        p.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        parser = build_parser(next((a for a in argv if not a.startswith("-")), ""))
        args, extra = parser.parse_known_args(argv)
        if args.command is None:
            parser.print_help()
            return 0
        if extra and not getattr(args, "accepts_overrides", False):
            raise UserError(
                f"lmforge {args.command}: unrecognized arguments: {' '.join(extra)} "
                f"(see lmforge {args.command} --help)"
            )
        args.overrides = extra
        return args.run(args) or 0
    except UserError as e:
        print(f"lmforge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmforge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
