"""`lmforge export CKPT_OR_RUN --format hf|gguf --out PATH`."""

from __future__ import annotations

import argparse
from pathlib import Path

from lmforge.commands._args import add_checkpoint
from lmforge.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `lmforge export`."""
    add_checkpoint(p)
    p.add_argument(
        "--format",
        choices=("hf", "gguf"),
        default="hf",
        help="hf: Hugging Face folder (transformers); gguf: one file for llama.cpp",
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="PATH",
        help="output folder (hf), or a .gguf file / folder for model.gguf (gguf)",
    )
    p.add_argument(
        "--dtype",
        choices=("fp32", "bf16", "fp16"),
        default="fp32",
        help="weight precision in the file (gguf: fp32 or fp16; bf16 only for hf)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace files in an existing output (default: refuse a non-empty --out)",
    )


def run(args: argparse.Namespace) -> int:
    """`lmforge export`: load the checkpoint and its tokenizer, write the chosen format."""
    if args.format == "gguf" and args.dtype == "bf16":
        raise UserError("--dtype bf16 is for --format hf; use fp32 or fp16 with gguf")
    from lmforge.export import export_gguf, export_hf, refuse_existing
    from lmforge.train.checkpoint import load_model, load_run_tokenizer

    out = Path(args.out)
    # Refuse before loading anything: a clear answer fast, and nothing touched.
    refuse_existing(out, args.overwrite)
    model, state = load_model(args.checkpoint)
    tokenizer = load_run_tokenizer(state)
    sft = state.get("phase") == "sft"
    source = {"source_checkpoint": state.get("path"), "phase": state.get("phase", "pretrain")}
    if args.format == "hf":
        written = export_hf(
            model,
            tokenizer,
            out,
            sft=sft,
            dtype=args.dtype,
            overwrite=args.overwrite,
            source=source,
        )
        print(
            f"wrote {len(written)} files to {out} (Hugging Face {model.cfg.block} model, "
            f"{args.dtype}); load with AutoModelForCausalLM.from_pretrained('{out}')"
        )
    else:
        path = export_gguf(
            model,
            tokenizer,
            out,
            sft=sft,
            dtype=args.dtype,
            overwrite=args.overwrite,
            name=Path(state["path"]).stem,
        )
        print(
            f"wrote {path} ({path.stat().st_size:,} bytes, GGUF "
            f"{'llama' if model.cfg.block == 'llama' else 'gpt2'}, {args.dtype})"
        )
    return 0
