"""`lmforge prepare`: raw text (or the built-in stories) -> train.bin / val.bin / meta.json."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``lmforge prepare``."""
    parser.add_argument(
        "inputs",
        nargs="*",
        metavar="INPUT",
        help=".txt, .jsonl or .parquet files, folders (searched recursively) or globs",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (required)")
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="gpt2 | bpe:N | char | byte | word | word:N (default: gpt2; char for --builtin)",
    )
    parser.add_argument(
        "--field",
        default="text",
        help="text field of .jsonl/.parquet/--hf-dataset records (default: %(default)s)",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.005,
        help="fraction of documents held out for validation, at least one context window "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the train/val split and of --builtin (default: %(default)s)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="encoding processes (default: all cores)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty output folder (default: refuse)",
    )
    parser.add_argument(
        "--errors",
        choices=("strict", "replace"),
        default="strict",
        help="non-UTF-8 bytes: strict stops with the file and offset, replace goes on "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--context",
        type=int,
        default=256,
        help="context length; val gets at least context+1 tokens (default: %(default)s)",
    )
    parser.add_argument(
        "--doc-per-file",
        action="store_true",
        help=".txt: each file is one document (default: documents separated by blank lines)",
    )
    parser.add_argument(
        "--doc-separator",
        default=None,
        metavar="LINE",
        help=".txt: documents separated by lines equal to LINE, e.g. '<|endoftext|>' "
        "(default: blank lines)",
    )
    parser.add_argument(
        "--builtin",
        choices=("stories",),
        default=None,
        help="generate the built-in synthetic story corpus instead of reading files (default: off)",
    )
    parser.add_argument(
        "--size-mb",
        type=float,
        default=4.0,
        help="--builtin: megabytes of text to generate (default: %(default)s)",
    )
    parser.add_argument(
        "--quiz",
        type=int,
        default=0,
        metavar="N",
        help="--builtin stories: follow each story with N lines 'question answer' about it, a "
        "reading quiz that teaches pretraining to look facts up in the story (the demo uses 3; "
        "the floor counts the choice of questions; default: %(default)s)",
    )
    parser.add_argument(
        "--hf-dataset",
        default=None,
        metavar="NAME",
        help="Hugging Face dataset name or a save_to_disk folder (default: off; needs lmforge[hf])",
    )
    parser.add_argument(
        "--hf-split",
        default="train",
        help="--hf-dataset: split to read (default: %(default)s)",
    )


def run(args: argparse.Namespace) -> int:
    """Run ``lmforge prepare`` from parsed arguments; prints the summary; returns 0."""
    from lmforge.data.prepare import format_summary, prepare

    tokenizer = args.tokenizer or ("char" if args.builtin else "gpt2")
    summary = prepare(
        inputs=list(args.inputs),
        out_dir=args.out,
        tokenizer=tokenizer,
        field=args.field,
        val_fraction=args.val_fraction,
        seed=args.seed,
        workers=args.workers,
        overwrite=args.overwrite,
        errors=args.errors,
        context=args.context,
        doc_per_file=args.doc_per_file,
        doc_separator=args.doc_separator,
        builtin=args.builtin,
        size_mb=args.size_mb,
        quiz=args.quiz,
        hf_dataset=args.hf_dataset,
        hf_split=args.hf_split,
    )
    print(format_summary(summary))
    return 0
