"""`lmforge generate CKPT_OR_RUN --prompt TEXT`: one prompt, streamed."""

from __future__ import annotations

import argparse
import sys

from lmforge.commands._args import add_checkpoint, add_device, add_sampling, positive, sampling_from


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_checkpoint(p)
    p.add_argument("--prompt", required=True, help="text to continue (or the user message)")
    add_sampling(p, max_new_tokens=200, temperature=0.8)
    p.add_argument("--num-samples", type=int, default=1, help="independent samples to print")
    p.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="wrap the prompt in the chat template (default: on for SFT models)",
    )
    add_device(p)


def run(args: argparse.Namespace) -> int:
    positive("--num-samples", args.num_samples)
    sampling = sampling_from(args)
    import torch

    from lmforge.generate import StreamPrinter, load_for_generation, prompt_ids

    loaded = load_for_generation(args.checkpoint, args.device)
    chat = loaded.instruction_tuned if args.chat is None else args.chat
    prompt = prompt_ids(loaded, args.prompt, chat)
    for i in range(args.num_samples):
        if i:
            sys.stdout.write("\n\n")
        if not chat:
            sys.stdout.write(args.prompt)  # a continuation reads as one text
        printer = StreamPrinter(loaded.tokenizer, sys.stdout)
        with torch.no_grad():
            sampling.generate(loaded, prompt, chat, seed_offset=i, on_token=printer)
        printer.finish()
    sys.stdout.write("\n")
    sys.stdout.flush()
    return 0
