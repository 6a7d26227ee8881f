"""`lmforge chat CKPT_OR_RUN`: interactive, multi-turn, streamed; stdin may be piped."""

from __future__ import annotations

import argparse
import sys

from lmforge.commands._args import add_checkpoint, add_device, add_sampling, sampling_from


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_checkpoint(p)
    add_sampling(p, max_new_tokens=200, temperature=0.7)
    add_device(p)


def run(args: argparse.Namespace) -> int:
    sampling = sampling_from(args)
    from lmforge.generate import ChatSession, load_for_generation

    loaded = load_for_generation(args.checkpoint, args.device)
    interactive = sys.stdin.isatty()
    if not loaded.instruction_tuned:
        print(
            f"note: {loaded.path} is not instruction-tuned (phase {loaded.phase}); its "
            "answers are continuations at best (run lmforge sft first)",
            file=sys.stderr,
        )
    session = ChatSession(loaded, sampling, sys.stdout, one_line=not interactive)
    if interactive:
        print(
            f"chatting with {loaded.path} | /reset clears the history, /exit (or Ctrl-D) "
            "leaves, \\n in a line is a line break"
        )
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        text = line.strip().replace("\\n", "\n")  # a typed \n is a line break
        if text == "/exit":
            break
        if text == "/reset":
            session.reset()
            if interactive:
                print("(history cleared)")
            continue
        if not text:
            continue
        if interactive:
            sys.stdout.write("bot> ")
        session.answer(text)
    return 0
