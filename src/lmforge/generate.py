"""`lmforge generate` (one prompt) and `lmforge chat` (interactive, multi-turn), both streaming.

A checkpoint says which phase wrote it: instruction-tuned ("sft") models get the chat template
(`render_prompt`) and stop at `<|end|>`; phase-1 models continue plain text and stop at eot.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

import torch

from lmforge.config import N_CHAT_TOKENS
from lmforge.data.instruct import Conversation, Turn, chat_ids, render_prompt
from lmforge.errors import UserError


@dataclass
class LoadedModel:
    """A model ready to generate: weights, tokenizer, and what its phase implies."""

    model: Any
    tokenizer: Any
    phase: str
    path: str
    tokenizer_identity: dict[str, Any]

    @property
    def instruction_tuned(self) -> bool:
        return self.phase == "sft"

    @property
    def vocab_limit(self) -> int:
        """Ids the model may emit: the chat tokens only once SFT has trained them."""
        extra = N_CHAT_TOKENS if self.instruction_tuned else 0
        return self.tokenizer.vocab_size + extra

    def stop_tokens(self, chat: bool) -> list[int]:
        stop = [self.tokenizer.eot_id]
        if chat:
            ids = chat_ids(self.tokenizer)
            stop += [ids.end, ids.user, ids.assistant]  # a reply ends at <|end|> (or a role)
        return stop

    @property
    def context(self) -> int:
        return self.model.cfg.context


def load_for_generation(ckpt_or_run: str, device: str = "auto") -> LoadedModel:
    """Model, tokenizer and phase of a checkpoint file or run folder."""
    from lmforge.device import pick
    from lmforge.train.checkpoint import load_model, load_run_tokenizer

    precision = pick(device, "fp32")
    model, state = load_model(ckpt_or_run, device=precision.device)
    tokenizer = load_run_tokenizer(state)
    identity = state.get("tokenizer") or tokenizer.identity()
    return LoadedModel(model, tokenizer, str(state.get("phase", "pretrain")), state["path"],
                       identity)


class StreamPrinter:
    """Prints decoded text as ids arrive: decode all ids so far, print the new suffix.

    A multi-byte character split across tokens decodes to U+FFFD until its last byte comes, so
    a trailing replacement character is held back until the next token (or `finish`).
    """

    def __init__(self, tokenizer: Any, out: TextIO, transform: Callable[[str], str] = str):
        self.tokenizer, self.out, self.transform = tokenizer, out, transform
        self.ids: list[int] = []
        self.printed = ""

    def __call__(self, row: int, token: int) -> None:
        self.ids.append(token)
        self._emit(final=False)

    def _emit(self, final: bool) -> None:
        text = self.tokenizer.decode(self.ids)
        if not final and text.endswith("\ufffd"):
            return
        # Decoding is not always prefix-stable (a BPE merge may rewrite the tail): print what
        # lies past the length already shown, never reprint.
        new = text[len(self.printed):]
        if new:
            self.out.write(self.transform(new))
            self.out.flush()
        self.printed = text

    def finish(self) -> str:
        self._emit(final=True)
        return self.printed


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise UserError(f"{name} must be {'>= 0' if allow_zero else 'positive'} (got {value})")


# ---------------------------------------------------------------------------------- generate
def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CKPT_OR_RUN",
                   help="checkpoint file, or run folder (its best.pt, else final, else newest)")
    p.add_argument("--prompt", required=True, help="text to continue (or the user message)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="sampling temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="divide the logits of tokens already present (1 = off)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("--num-samples", type=int, default=1, help="independent samples to print")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap the prompt in the chat template (default: on for SFT models)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")


def _check_sampling(args: argparse.Namespace) -> None:
    _positive("--max-new-tokens", args.max_new_tokens)
    _positive("--temperature", args.temperature, allow_zero=True)
    _positive("--top-k", args.top_k, allow_zero=True)
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1] (got {args.top_p})")
    _positive("--repetition-penalty", args.repetition_penalty)


def run_generate(args: argparse.Namespace) -> int:
    _check_sampling(args)
    _positive("--num-samples", args.num_samples)
    loaded = load_for_generation(args.checkpoint, args.device)
    chat = loaded.instruction_tuned if args.chat is None else args.chat
    tok = loaded.tokenizer
    if chat:
        prompt_ids = render_prompt([Turn("user", args.prompt)], tok)
    else:
        prompt_ids = tok.encode(args.prompt) or [tok.eot_id]
        sys.stdout.write(args.prompt)  # a continuation reads as one text
    for i in range(args.num_samples):
        if i:
            sys.stdout.write("\n\n" + ("" if chat else args.prompt))
        printer = StreamPrinter(tok, sys.stdout)
        loaded.model.generate(
            prompt_ids, args.max_new_tokens, temperature=args.temperature,
            top_k=args.top_k or None, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
            stop_tokens=loaded.stop_tokens(chat),
            seed=None if args.seed is None else args.seed + i,
            vocab_limit=loaded.vocab_limit, on_token=printer)
        printer.finish()
    sys.stdout.write("\n")
    sys.stdout.flush()
    return 0


# -------------------------------------------------------------------------------------- chat
def add_chat_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CKPT_OR_RUN",
                   help="checkpoint file, or run folder (its best.pt, else final, else newest)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens per answer at most")
    p.add_argument("--temperature", type=float, default=0.7,
                   help="sampling temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="divide the logits of tokens already present (1 = off)")
    p.add_argument("--seed", type=int, default=None,
                   help="sampling seed; answer n uses seed + n (default: random)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")


def prompt_budget(context: int, max_new_tokens: int) -> int:
    """Tokens of history a chat prompt may use: all the context but room for a short answer.

    Reserving the whole ``--max-new-tokens`` (200 by default) would leave a 256-token model 56
    tokens of history, cutting off the story a question is about. An answer that outgrows the
    room left slides the window (``Transformer.generate``), as it would in any case.
    """
    return max(1, context - min(max_new_tokens, max(1, context // 8)))


def fit_history(history: Conversation, tokenizer: Any,
                budget: int) -> tuple[Conversation, list[int]]:
    """Drop the oldest turns until the prompt fits `budget` tokens; the last user turn stays
    (cut from the left if it alone is too long, so that its end, the question, is kept)."""
    while True:
        ids = render_prompt(history, tokenizer)
        if len(ids) <= budget or len(history) <= 1:
            return history, ids[-budget:]
        history = history[1:]
        if history and history[0].role == "assistant":  # a conversation opens with the user
            history = history[1:]


class ChatSession:
    """The conversation so far and one answer per user message."""

    def __init__(self, loaded: LoadedModel, args: argparse.Namespace, out: TextIO,
                 one_line: bool):
        self.loaded, self.args, self.out, self.one_line = loaded, args, out, one_line
        self.history: Conversation = []
        self.answers = 0

    def reset(self) -> None:
        self.history = []

    def answer(self, text: str) -> str:
        a, tok = self.args, self.loaded.tokenizer
        budget = prompt_budget(self.loaded.context, a.max_new_tokens)
        self.history, prompt = fit_history([*self.history, Turn("user", text)], tok, budget)
        # Piped output: one answer line per user line, so newlines inside an answer are spaces.
        transform = (lambda s: s.replace("\n", " ")) if self.one_line else str
        printer = StreamPrinter(tok, self.out, transform)
        self.loaded.model.generate(
            prompt, a.max_new_tokens, temperature=a.temperature, top_k=a.top_k or None,
            top_p=a.top_p, repetition_penalty=a.repetition_penalty,
            stop_tokens=self.loaded.stop_tokens(chat=True),
            seed=None if a.seed is None else a.seed + self.answers,
            vocab_limit=self.loaded.vocab_limit, on_token=printer)
        reply = printer.finish().strip()
        self.out.write("\n")
        self.out.flush()
        self.answers += 1
        self.history.append(Turn("assistant", reply))
        return reply


def run_chat(args: argparse.Namespace) -> int:
    _check_sampling(args)
    loaded = load_for_generation(args.checkpoint, args.device)
    interactive = sys.stdin.isatty()
    if not loaded.instruction_tuned:
        print(f"note: {loaded.path} is not instruction-tuned (phase {loaded.phase}); its "
              "answers are continuations at best (run lmforge sft first)", file=sys.stderr)
    session = ChatSession(loaded, args, sys.stdout, one_line=not interactive)
    if interactive:
        print(f"chatting with {loaded.path} | /reset clears the history, /exit (or Ctrl-D) "
              "leaves, \\n in a line is a line break")
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
        with torch.no_grad():
            session.answer(text)
    return 0
