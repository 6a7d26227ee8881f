"""Generation from a checkpoint: what `lmforge generate`, `chat`, `eval` and `serve` share.

A checkpoint says which phase wrote it: instruction-tuned ("sft") models get the chat template
(`render_prompt`) and stop at `<|end|>`; phase-1 models continue plain text and stop at eot.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

import torch

from lmforge.chat_format import N_CHAT_TOKENS, Conversation, Turn, render_prompt, stop_ids


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
        """A reply ends at <|end|> (or a role token, or eot); a continuation at eot."""
        return stop_ids(self.tokenizer) if chat else [self.tokenizer.eot_id]

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
    return LoadedModel(
        model, tokenizer, str(state.get("phase", "pretrain")), state["path"], identity
    )


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
        new = text[len(self.printed) :]
        if new:
            self.out.write(self.transform(new))
            self.out.flush()
        self.printed = text

    def finish(self) -> str:
        self._emit(final=True)
        return self.printed


@dataclass
class Sampling:
    """How to pick each new token (the options of generate, chat, eval and serve)."""

    max_new_tokens: int = 200
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 0  # 0 = all
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off
    seed: int | None = None  # None = random

    def generate(
        self,
        loaded: LoadedModel,
        prompt: list[int],
        chat: bool,
        seed_offset: int = 0,
        on_token: Callable[[int, int], None] | None = None,
    ) -> list[int]:
        """New ids after `prompt` (stopping at the end of a reply, or of the text)."""
        return loaded.model.generate(
            prompt, self.max_new_tokens, temperature=self.temperature, top_k=self.top_k or None,
            top_p=self.top_p, repetition_penalty=self.repetition_penalty,
            stop_tokens=loaded.stop_tokens(chat),
            seed=None if self.seed is None else self.seed + seed_offset,
            vocab_limit=loaded.vocab_limit, on_token=on_token)  # fmt: skip


def prompt_ids(loaded: LoadedModel, text: str, chat: bool) -> list[int]:
    """A user message through the chat template, or plain text to continue."""
    tok = loaded.tokenizer
    if chat:
        return render_prompt([Turn("user", text)], tok)
    return tok.encode(text) or [tok.eot_id]


def prompt_budget(context: int, max_new_tokens: int) -> int:
    """Tokens of history a chat prompt may use: all the context but room for a short answer.

    Reserving the whole ``--max-new-tokens`` (200 by default) would leave a 256-token model 56
    tokens of history, cutting off the story a question is about. An answer that outgrows the
    room left slides the window (``Transformer.generate``), as it would in any case.
    """
    return max(1, context - min(max_new_tokens, max(1, context // 8)))


def fit_history(
    history: Conversation, tokenizer: Any, budget: int
) -> tuple[Conversation, list[int]]:
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

    def __init__(self, loaded: LoadedModel, sampling: Sampling, out: TextIO, one_line: bool):
        self.loaded, self.sampling, self.out, self.one_line = loaded, sampling, out, one_line
        self.history: Conversation = []
        self.answers = 0

    def reset(self) -> None:
        self.history = []

    def answer(self, text: str) -> str:
        tok = self.loaded.tokenizer
        budget = prompt_budget(self.loaded.context, self.sampling.max_new_tokens)
        self.history, prompt = fit_history([*self.history, Turn("user", text)], tok, budget)
        # Piped output: one answer line per user line, so newlines inside an answer are spaces.
        transform = (lambda s: s.replace("\n", " ")) if self.one_line else str
        printer = StreamPrinter(tok, self.out, transform)
        with torch.no_grad():
            self.sampling.generate(self.loaded, prompt, True, self.answers, printer)
        reply = printer.finish().strip()
        self.out.write("\n")
        self.out.flush()
        self.answers += 1
        self.history.append(Turn("assistant", reply))
        return reply
