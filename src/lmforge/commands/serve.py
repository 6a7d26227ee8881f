"""`lmforge serve CKPT_OR_RUN`: the model behind an OpenAI-compatible API and a chat page."""

from __future__ import annotations

import argparse

from lmforge.commands._args import add_checkpoint, add_device
from lmforge.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_checkpoint(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 opens it to the network, with no "
                        "authentication")  # fmt: skip
    p.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port)")
    p.add_argument(
        "--name", default=None, help="model id the API answers to (default: the run folder's name)"
    )
    add_device(p)


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be in 0..65535 (got {args.port})")
    try:
        from lmforge.serve import serve
    except ImportError as e:
        raise UserError(f"lmforge serve needs {e.name or 'fastapi and uvicorn'}: "
                        "pip install 'lmforge[serve]'") from e  # fmt: skip
    from lmforge.generate import load_for_generation

    loaded = load_for_generation(args.checkpoint, args.device)
    serve(loaded, args.host, args.port, args.name, announce=lambda line: print(line, flush=True))
    return 0
