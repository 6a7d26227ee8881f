"""The `lmforge` command: one subcommand per stage (`lmforge.commands`), each a thin layer over
the library.

User mistakes raise `UserError`; here they become one line on stderr and exit status 2, and so do
the disk's refusals (full, read-only, no permission, I/O error). Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType

from lmforge import __version__
from lmforge.commands import COMMANDS
from lmforge.commands._args import Formatter, Parser
from lmforge.errors import UserError


def command_module(name: str) -> ModuleType:
    return importlib.import_module(f"lmforge.commands.{COMMANDS[name][0]}")


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
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=Formatter)
        if command is None or command == name:
            command_module(name).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    from lmforge.distributed import PeerFailed
    from lmforge.files import disk_error

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
        return command_module(args.command).run(args) or 0
    except PeerFailed:  # under torchrun: the rank that refused has printed why
        return 2
    except UserError as e:
        print(f"lmforge: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the disk said no outside a guarded write: still one line
        if e.errno is None or e.filename is None:
            raise
        print(f"lmforge: error: {disk_error(e.filename, e, 'access')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmforge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
