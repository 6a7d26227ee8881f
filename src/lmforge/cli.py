"""The `lmforge` command: one subcommand per stage (`lmforge.commands`, where the parser is
built), each a thin layer over the library.

User mistakes raise `UserError`; here they become one line on stderr and exit status 2, and so do
the disk's refusals (full, read-only, no permission, I/O error). Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import sys

from lmforge.commands import build_parser, command_module
from lmforge.errors import UserError


def main(argv: list[str] | None = None) -> int:
    from lmforge.errors import PeerFailed
    from lmforge.files import DISK_ERRNOS, disk_error

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
    except BrokenPipeError:  # `lmforge ... | head`: the reader has gone, nothing to say
        return 0
    except OSError as e:  # the disk said no outside a guarded write: still one line
        if e.errno not in DISK_ERRNOS:
            raise  # not the disk's refusal: a bug, with its traceback
        where = e.filename or "a file"
        print(f"lmforge: error: {disk_error(where, e, 'write')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmforge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
