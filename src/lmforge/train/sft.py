"""Phase 2, instruction tuning: the model and tokenizer come from a phase-1 checkpoint (weights
only, fresh optimizer), the batches from instruction files rendered with the chat template, and
the loss is normalised by the assistant tokens of the whole step (`loss_normalisation="tokens"`).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.chat_format import N_CHAT_TOKENS, Conversation, Example, chat_ids
from lmforge.config import Config
from lmforge.data.instruct import SFTBatches, check_data_tokenizer, load_sources, render_all
from lmforge.device import Precision
from lmforge.distributed import Dist
from lmforge.errors import UserError
from lmforge.info import count_parameters, model_summary
from lmforge.model import Transformer
from lmforge.tokenizers import Tokenizer
from lmforge.train.checkpoint import load_model, load_run_tokenizer
from lmforge.train.phase import Phase
from lmforge.train.trainer import Batches


class InstructionBatches(Batches):
    """`SFTBatches` behind the Trainer's `Batches` interface. Micro-batches run on across steps
    and epochs; with N processes, rank r of step s reads micro-batches (s*N + r)*g .. +g-1, so N
    processes read what one process with N times the accumulation reads."""

    def __init__(self, inner: SFTBatches, grad_accum: int = 1, rank: int = 0, world: int = 1):
        self.inner, self.grad_accum, self.rank, self.world = inner, grad_accum, rank, world
        self.batches_per_epoch = inner.batches_per_epoch

    def get(self, step: int, micro_step: int) -> dict[str, torch.Tensor]:
        flat = (step * self.world + self.rank) * self.grad_accum + micro_step
        batch = self.inner.batch(*divmod(flat, self.inner.batches_per_epoch))
        batch.pop("attention_mask", None)  # right padding: causal attention already ignores it
        return batch

    def epoch_of(self, step: int) -> int:
        return step * self.grad_accum * self.world // self.batches_per_epoch


def sft_phase(cfg: Config, d: Dist, precision: Precision) -> Phase:
    t, s = cfg.train, cfg.sft
    model, init, tokenizer, identity = _start_from(cfg)
    conversations = load_sources(s.data, s.weights or None, skip_bad=s.skip_bad, seed=t.seed,
                                 allow_plain_text=s.allow_plain_text,
                                 questions_per_story=s.questions_per_story)  # fmt: skip
    model, extended = chat_ready_model(model, tokenizer.vocab_size)
    cfg.model = m = model.cfg  # the checkpoint's shape, not the YAML's: config.yaml says what ran
    train_conv, val_conv = split_conversations(list(conversations), s.val_fraction, t.seed)
    train_ex, dropped = _render(train_conv, tokenizer, m.context, "training")
    val_ex, _ = _render(val_conv, tokenizer, m.context, "validation")
    pad = chat_ids(tokenizer).pad
    train = SFTBatches(train_ex, t.batch_size, t.seed, pad_id=pad, pack=s.pack, seq_len=m.context)
    val = SFTBatches(val_ex, t.batch_size, t.seed + 1, pad_id=pad, pack=s.pack, seq_len=m.context)
    steps_per_epoch = max(1, -(-train.batches_per_epoch // (t.grad_accum * d.world_size)))
    describe = [f"init from {init['path']}: {model_summary(m)}"
                + (" (embedding extended for the chat tokens)" if extended else "")]  # fmt: skip
    describe += _describe_data(conversations, (len(train_ex), len(val_ex)), train, s.pack)
    return Phase(
        name="sft",
        model=model,
        tokenizer=tokenizer,
        train_batches=InstructionBatches(train, t.grad_accum, d.rank, d.world_size),
        val_batches=InstructionBatches(val),
        data_identity={"tokenizer": identity, **train.state_dict()},
        describe=describe,
        settings={
            "max_epochs": s.max_epochs,
            "patience": s.patience,
            "min_delta": s.min_delta,
            "loss_normalisation": "tokens",
            "eval_every": t.eval_every or steps_per_epoch,
        },  # fmt: skip
        run_info={
            "init_from": init["path"],
            "data": s.data,
            "weights": s.weights,
            "pack": s.pack,
            "params": count_parameters(m),
            "sources": [src.__dict__ for src in conversations.sources],
            "examples": {
                "train": len(train_ex),
                "val": len(val_ex),
                "skipped": conversations.skipped,
            },  # fmt: skip
        },
        chat=True,
        vocab_limit=tokenizer.vocab_size + N_CHAT_TOKENS,
        init_from=Path(init["path"]),
        warnings=_warnings(dropped, unknown_fraction(train_ex[:2000], tokenizer), m.context),
    )


def _start_from(cfg: Config) -> tuple[Transformer, dict[str, Any], Tokenizer, dict[str, Any]]:
    """The phase-1 model, its checkpoint record, its tokenizer and that tokenizer's identity,
    after checking that the instruction data was prepared for that tokenizer."""
    if not cfg.train.init_from:
        raise UserError("lmforge sft needs --init-from CKPT_OR_RUN: the phase-1 checkpoint or "
                        "run folder to start from")  # fmt: skip
    if not cfg.sft.data:
        raise UserError("sft.data is not set: name instruction files, e.g. "
                        "--sft.data=stories-qa:data/stories/qa_train.jsonl")  # fmt: skip
    model, init = load_model(cfg.train.init_from)
    tokenizer = load_run_tokenizer(init)
    identity = init.get("tokenizer") or tokenizer.identity()
    check_data_tokenizer(cfg.sft.data, identity)
    return model, init, tokenizer, identity


def _describe_data(conversations, examples: tuple[int, int], train: SFTBatches, pack: bool
                   ) -> list[str]:  # fmt: skip
    lines = [
        f"data {src.path} ({src.format}): {src.records:,} conversations, weight {src.weight:g}, "
        f"used {src.used:,}" + (f", skipped {src.skipped}" if src.skipped else "")
        for src in conversations.sources
    ]
    lines.append(f"examples: {examples[0]:,} train / {examples[1]:,} val "
                 f"({'packed' if pack else 'padded'}, {train.batches_per_epoch:,} batches per "
                 "epoch)")  # fmt: skip
    return lines


def _warnings(dropped: int, unknown: float, context: int) -> list[str]:
    warnings = []
    if dropped:
        warnings.append(f"warning: {dropped:,} conversations left out: the model's context "
                        f"({context} tokens) cuts away all of their assistant text")  # fmt: skip
    if unknown > 0.01:
        warnings.append(f"warning: {100 * unknown:.1f}% of the training ids are the tokenizer's "
                        "unknown id: the data uses characters the checkpoint's vocabulary "
                        "lacks")  # fmt: skip
    return warnings


def chat_ready_model(model: Transformer, tokenizer_vocab: int) -> tuple[Transformer, bool]:
    """The model with rows for the chat tokens: as is when its padded vocabulary has them,
    else a copy with the embedding (and an untied head) extended, new rows = the mean row."""
    cfg = model.cfg
    if cfg.padded_vocab >= tokenizer_vocab + N_CHAT_TOKENS:
        return model, False
    # pad_vocab_multiple <= 1 is the only way to have no spare rows; pad as phase 1 would have.
    bigger = Transformer(replace(cfg, pad_vocab_multiple=64))
    state = model.state_dict()
    for key in ("wte.weight", "lm_head.weight"):
        if key not in state:
            continue
        old = state[key]
        mean = old.mean(dim=0, keepdim=True)
        new_rows = mean.expand(bigger.cfg.padded_vocab - old.shape[0], -1)
        state[key] = torch.cat([old, new_rows], dim=0)
    bigger.load_state_dict(state)
    return bigger, True


def split_conversations(
    conversations: list[Conversation], val_fraction: float, seed: int
) -> tuple[list[Conversation], list[Conversation]]:
    """Seeded split by whole conversation: no conversation is in both train and val."""
    n = len(conversations)
    if n < 2:
        raise UserError(f"the SFT data holds {n} conversation(s): at least 2 are needed "
                        "(one for training, one for validation)")  # fmt: skip
    n_val = min(n - 1, max(1, round(val_fraction * n)))
    order = np.random.default_rng([seed, 7]).permutation(n)
    val = set(order[:n_val].tolist())
    train = [c for i, c in enumerate(conversations) if i not in val]
    return train, [conversations[i] for i in sorted(val)]


def unknown_fraction(examples: list[Example], tokenizer: Any) -> float:
    """Share of ids that are the tokenizer's unknown id (a char vocabulary meeting new text)."""
    unk = getattr(tokenizer, "unk_id", None)
    total = sum(len(ids) for ids, _ in examples)
    if unk is None or not total:
        return 0.0
    return sum(ids.count(unk) for ids, _ in examples) / total


def _render(conversations: list[Conversation], tokenizer: Any, context: int,
            what: str) -> tuple[list[Example], int]:  # fmt: skip
    rendered = render_all(conversations, tokenizer, max_len=context)
    if not rendered.examples:
        raise UserError(f"no {what} examples left: every assistant reply lies beyond the "
                        f"model's context ({context} tokens)")  # fmt: skip
    return rendered.examples, rendered.dropped
