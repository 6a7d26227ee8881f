"""`lmforge eval CKPT_OR_RUN --data DIR_OR_FILE`: loss/perplexity, or EM/F1/accuracy of answers.

Results are printed as a table and, with `--json`, written as JSON (scores in percent).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from lmforge.commands._args import add_checkpoint, add_device
from lmforge.errors import UserError
from lmforge.files import write_json


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_checkpoint(p)
    p.add_argument(
        "--data",
        required=True,
        metavar="DIR_OR_FILE",
        help="prepared folder (loss/perplexity) or Q&A files, comma-separated, "
        "FORMAT:PATH to force a format (alpaca, squad, dailydialog, chat, "
        "stories-qa)",
    )
    p.add_argument(
        "--limit",
        type=int,
        default=0,
        help="evaluate only the first N examples (Q&A) or windows (tokens); 0 = all",
    )
    p.add_argument("--json", default=None, metavar="OUT", help="also write the results here")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens per generated answer")
    p.add_argument(
        "--metrics",
        default="em,f1,accuracy",
        help="Q&A metrics, comma-separated: em, f1, accuracy (story Q&A), and with "
        "pip install 'lmforge[eval]': rouge, bleu",
    )
    p.add_argument(
        "--batch-size", type=int, default=16, help="prompts (or windows) evaluated together"
    )
    p.add_argument(
        "--split",
        choices=("val", "train"),
        default="val",
        help="which token file of a prepared folder",
    )
    p.add_argument(
        "--skip-bad", action="store_true", help="skip malformed Q&A records instead of stopping"
    )
    p.add_argument("--show", type=int, default=3, help="example answers to print")
    add_device(p)


def run(args: argparse.Namespace) -> int:
    for name in ("limit", "show"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name} must be >= 0 (got {getattr(args, name)})")
    for name in ("max_new_tokens", "batch_size"):
        if getattr(args, name) <= 0:
            raise UserError(
                f"--{name.replace('_', '-')} must be positive (got {getattr(args, name)})"
            )
    from lmforge.evaluate import parse_metrics, qa_eval, token_eval  # torch: after the checks
    from lmforge.generate import load_for_generation

    metrics = parse_metrics(args.metrics)
    loaded = load_for_generation(args.checkpoint, args.device)
    start = time.time()
    data = Path(args.data)
    if data.is_dir() and (data / "meta.json").is_file():
        result = token_eval(loaded, data, args.split, args.limit, args.batch_size)
    else:
        result = qa_eval(
            loaded,
            args.data,
            metrics,
            args.limit,
            args.max_new_tokens,
            args.batch_size,
            args.skip_bad,
            args.show,
        )
    result["seconds"] = round(time.time() - start, 2)
    print_table(result)
    if args.json:
        write_json(Path(args.json), result)  # atomic: a failed write leaves the old file
        print(f"results: {args.json}")
    return 0


def print_table(result: dict[str, Any]) -> None:
    what = (
        f"{result['examples']:,} examples"
        if result["kind"] == "qa"
        else f"{result['windows']:,} windows, {result['tokens']:,} tokens ({result['split']})"
    )
    print(
        f"eval {result['checkpoint']} (phase {result['phase']}) on {result['data']}: {what}, "
        f"{result['seconds']:.1f} s"
    )
    rows = [(name, value) for name, value in result["metrics"].items()]
    for fmt, scores in result.get("per_format", {}).items():
        rows += [(f"{name} [{fmt}]", value) for name, value in scores.items() if name != "examples"]
    width = max(len(name) for name, _ in rows)
    print(f"{'metric'.ljust(width)}  value")
    for name, value in rows:
        shown = f"{value:.4f}" if result["kind"] == "tokens" else f"{value:6.2f} %"
        print(f"{name.ljust(width)}  {shown}")
    by_kind = result.get("per_question") or {}
    if by_kind:
        print(
            "story Q&A accuracy by question: "
            + ", ".join(
                f"{kind} {v['accuracy']:.0f}% ({v['examples']})" for kind, v in by_kind.items()
            )
        )
    for p in result.get("predictions", [])[: result.get("shown", 0)]:
        print(
            f"  Q: {p['question'][:80]!r} gold {p['references'][0][:40]!r} -> "
            f"{p['prediction'][:60]!r}"
        )
