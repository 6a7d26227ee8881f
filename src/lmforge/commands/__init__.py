"""The `lmforge` subcommands, one module each: argparse -> config -> one library call.

This package is the only place where command-line parsers are built.
Each module has `add_arguments(parser)` and `run(args) -> int`; no module outside this package
builds a parser. A command's module is imported only when that command runs (or shows its
--help), so that `lmforge prepare --help` never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
from types import ModuleType

# name -> (module, one-line help shown by `lmforge --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "env": ("env", "print torch version, device, threads, CPU peak, compile and flash attention"),
    "model-info": ("model_info", "parameters by part, training memory and FLOPs per token"),
    "prepare": ("prepare", "turn text into token files (train.bin, val.bin, meta.json)"),
    "train": ("train", "pretrain a model (phase 1) on prepared data"),
    "sft": ("sft", "instruction-tune a pretrained model (phase 2)"),
    "generate": ("generate", "sample text from a checkpoint, streamed (phase 1 or SFT)"),
    "chat": ("chat", "talk to an instruction-tuned checkpoint (multi-turn, streaming)"),
    "serve": ("serve", "the model behind an OpenAI-compatible API and a web chat page"),
    "eval": ("eval", "loss/perplexity on prepared data; EM/F1/accuracy on Q&A data"),
    "export": ("export", "export a checkpoint to Hugging Face (transformers) or GGUF (llama.cpp)"),
    "report": ("report", "plots and a text summary of a run or a training log"),
    "compare": ("compare", "overlay the loss curves of several runs"),
}


def command_module(name: str) -> ModuleType:
    return importlib.import_module(f"lmforge.commands.{COMMANDS[name][0]}")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s options are built (None: all, e.g. for docs and tests)."""
    from lmforge import __version__
    from lmforge.commands._args import Formatter, Parser

    parser = Parser(
        prog="lmforge",
        formatter_class=Formatter,
        description="Train small GPT/Llama-style language models from scratch: "
        "prepare -> train -> sft -> report / generate / chat / eval / export.",
    )
    parser.add_argument("--version", action="version", version=f"lmforge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=Formatter)
        if command is None or command == name:
            command_module(name).add_arguments(p)
    return parser


def reference_markdown() -> str:
    """Every command and option as Markdown: the README's command reference (a test keeps the
    README equal to it, so no option goes undocumented; `make docs` rewrites it)."""
    from lmforge.commands._args import Formatter
    from lmforge.config import SECTIONS, config_help

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = []
    for name, p in sub.choices.items():
        out += [f"#### `lmforge {name}`", "", COMMANDS[name][1] + ".", ""]
        out += ["| argument | meaning |", "|---|---|"]
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            flag = ", ".join(action.option_strings) or action.metavar or action.dest
            if action.option_strings and action.nargs != 0 and action.metavar:
                flag += f" {action.metavar}"
            text = Formatter(name)._get_help_string(action) % {"default": action.default}
            if action.required and action.option_strings and "required" not in text:
                text += " (required)"
            out.append(f"| `{flag}` | {text.replace('|', chr(92) + '|')} |")
        if getattr(p, "epilog", None) and name == "train":
            out += ["", f"`train` and `sft` also take every config key as `--section.key=VALUE` "
                    f"({', '.join(SECTIONS)}); defaults and meanings:", "", "```",
                    config_help(), "```"]  # fmt: skip
        out.append("")
    return "\n".join(out).rstrip() + "\n"
