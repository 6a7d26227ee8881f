"""Phase 1: the model is new (or `train.init_from`), the batches are windows of token files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lmforge.config import Config
from lmforge.data.memmap import TokenBatches, read_meta
from lmforge.device import Precision
from lmforge.distributed import Dist
from lmforge.errors import UserError
from lmforge.info import count_parameters, model_summary
from lmforge.model import Transformer
from lmforge.tokenizers import load_tokenizer
from lmforge.train.phase import Phase
from lmforge.train.trainer import TokenFileBatches

IDENTITY_KEYS = ("vocab_size", "dtype", "train_tokens", "val_tokens", "eot_id")


def pretrain_phase(cfg: Config, d: Dist, precision: Precision) -> Phase:
    if not cfg.data.dir:
        raise UserError("data.dir is not set: point it at a folder made by `lmforge prepare` "
                        "(e.g. --data.dir=data/stories)")  # fmt: skip
    data_dir = Path(cfg.data.dir)
    meta = read_meta(data_dir)
    if meta.get("kind") == "instruction" and not cfg.data.allow_instruction_data:
        raise UserError(f"{data_dir} holds instruction data: phase 1 trains on plain text "
                        "(use `lmforge sft`, or --data.allow_instruction_data=true)")  # fmt: skip
    cfg.model.vocab_size = int(meta["vocab_size"])
    m, t = cfg.model, cfg.train
    tokenizer = load_tokenizer(data_dir)
    model = Transformer(m)  # seeded by the pipeline: the same weights on every rank
    if t.init_from:
        _init_weights(model, t.init_from)
    where = dict(rank=d.rank, world_size=d.world_size, device=precision.device)
    train = TokenBatches(data_dir / "train.bin", m.context, t.batch_size, t.seed,
                         mode=cfg.data.mode, stride=cfg.data.stride or None,
                         grad_accum=t.grad_accum, **where)  # fmt: skip
    doc = cfg.data.mode == "doc"  # then validation scores whole documents, as the floor does
    val = TokenBatches(data_dir / "val.bin", m.context, t.batch_size, t.seed + 1,
                       mode="doc" if doc else "random", first_doc_only=doc, **where)  # fmt: skip
    floor = meta.get("entropy_floor_nats_per_token")
    tok_name = meta.get("tokenizer", {}).get("name", "?")
    data_line = (f"data {data_dir}: {meta.get('train_tokens', 0):,} train / "
                 f"{meta.get('val_tokens', 0):,} val tokens, tokenizer {tok_name}")  # fmt: skip
    if floor is not None:
        data_line += f", entropy floor {floor:.4f} nats/token"
    return Phase(
        name="pretrain",
        model=model,
        tokenizer=tokenizer,
        train_batches=TokenFileBatches(train),
        val_batches=TokenFileBatches(val),
        data_identity={
            "tokenizer": meta.get("tokenizer", {}),
            **{k: meta.get(k) for k in IDENTITY_KEYS},
        },  # fmt: skip
        describe=[f"model {m.preset}: {model_summary(m)}", data_line],
        settings={"entropy_floor": floor, "chars_per_token": _chars_per_token(meta)},
        run_info={
            "data": cfg.data.dir,
            "entropy_floor": floor,
            "params": count_parameters(m),
        },  # fmt: skip
        vocab_limit=int(meta["vocab_size"]),
    )


def _chars_per_token(meta: dict[str, Any]) -> float | None:
    """Characters per token of the validation split (to state the floor distance per char)."""
    if meta.get("val_chars") and meta.get("val_tokens"):
        return meta["val_chars"] / meta["val_tokens"]
    return meta.get("bytes_per_token")


def _init_weights(model: Transformer, init_from: str) -> None:
    """`train.init_from`: a Hugging Face Llama / GPT-2 folder, or an lmforge checkpoint or run."""
    from lmforge.export import init_from_hf, is_hf_folder
    from lmforge.train.checkpoint import load_weights_into

    with torch.no_grad():
        if is_hf_folder(init_from):
            init_from_hf(model, init_from)
        else:
            load_weights_into(model, init_from)
