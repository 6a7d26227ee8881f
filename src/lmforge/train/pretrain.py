"""Phase 1: the model is new (or `train.init_from`), the batches are windows of token files.

Phase 1 pretrains on plain text: a folder that `prepare` made from instruction data (its
meta.json says `kind: instruction`) is refused unless `data.allow_instruction_data=true`.
With `train.init_from` a Hugging Face folder, the model's shape is the folder's config.json
(see `_shape_from_hf`).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from lmforge.config import Config, ModelConfig, model_config, padded_vocab_size, validate_model
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
    data_dir, meta, warnings = _checked_data(cfg)
    cfg.model.vocab_size = int(meta["vocab_size"])
    t = cfg.train
    tokenizer = load_tokenizer(data_dir)
    if t.init_from and _is_hf_folder(t.init_from):
        cfg.model, note = _shape_from_hf(cfg.model, Path(t.init_from), meta)
        warnings += note
    m = cfg.model
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
        describe=[f"model {m.preset}: {model_summary(m)}", _data_line(data_dir, meta)],
        settings={"entropy_floor": floor, "chars_per_token": _chars_per_token(meta)},
        run_info={
            "data": cfg.data.dir,
            "entropy_floor": floor,
            "params": count_parameters(m),
        },  # fmt: skip
        vocab_limit=int(meta["vocab_size"]),
        warnings=warnings,
    )


def _checked_data(cfg: Config) -> tuple[Path, dict[str, Any], list[str]]:
    """The prepared folder, its meta.json, and warnings; refuses instruction data unless allowed."""
    if not cfg.data.dir:
        raise UserError("data.dir is not set: point it at a folder made by `lmforge prepare` "
                        "(e.g. --data.dir=data/stories)")  # fmt: skip
    data_dir = Path(cfg.data.dir)
    _refuse_raw_instruction_file(data_dir)
    meta = read_meta(data_dir)
    formats, files = instruction_sources(meta)
    if formats and not cfg.data.allow_instruction_data:
        sft_data = ",".join(files) or "FILE"
        raise UserError(f"{data_dir} was prepared from instruction data ({formats}): phase 1 "
                        f"pretrains on plain text; tune on it with `lmforge sft "
                        f"--sft.data={sft_data}`, or pass --data.allow_instruction_data=true to "
                        "pretrain on its text anyway")  # fmt: skip
    warnings = []
    if formats:
        warnings.append(f"pretraining on instruction data ({formats}): "
                        "data.allow_instruction_data=true")  # fmt: skip
    return data_dir, meta, warnings


def _data_line(data_dir: Path, meta: dict[str, Any]) -> str:
    floor = meta.get("entropy_floor_nats_per_token")
    line = (f"data {data_dir}: {meta.get('train_tokens', 0):,} train / "
            f"{meta.get('val_tokens', 0):,} val tokens, tokenizer "
            f"{meta.get('tokenizer', {}).get('name', '?')}")  # fmt: skip
    return line + (f", entropy floor {floor:.4f} nats/token" if floor is not None else "")


def instruction_sources(meta: dict[str, Any]) -> tuple[str, list[str]]:
    """The instruction data a prepared folder was made from: ("alpaca: a.json", [its path]),
    or ("", []) for plain text. meta.json's `kind` says it; a folder prepared before `kind` was
    recorded is judged by its source files, where they still exist."""
    sources = [s for s in meta.get("sources", []) if isinstance(s, dict) and "path" in s]
    if meta.get("kind") is None:
        from lmforge.data.instruct import detect_format, looks_like_instruction_data

        found = [s for s in sources if Path(s["path"]).is_file()
                 and looks_like_instruction_data(s["path"])]  # fmt: skip
        found = [{**s, "format": detect_format(s["path"])} for s in found]
    elif meta.get("kind") == "instruction":
        found = [s for s in sources if s.get("format", "text") != "text"]
    else:
        return "", []
    named = [f"{s['format']}: {Path(s['path']).name}" for s in found]
    shown = ", ".join(named[:2]) + (f" and {len(named) - 2} more" if len(named) > 2 else "")
    if not shown and meta.get("kind") == "instruction":
        shown = ", ".join(meta.get("instruction_formats") or ["instruction"])
    return shown, [str(s["path"]) for s in found]


def _refuse_raw_instruction_file(data_dir: Path) -> None:
    """data.dir naming an instruction file itself (not a prepared folder): say what it is."""
    if not data_dir.is_file():
        return
    from lmforge.data.instruct import FORMATS, detect_format

    try:
        found = detect_format(data_dir)
    except UserError:
        return
    if found in FORMATS:
        raise UserError(f"data.dir {data_dir} is a file of {found} instruction data, not a "
                        "folder made by `lmforge prepare`: tune on it with `lmforge sft "
                        f"--sft.data={data_dir}`, or prepare it for phase 1 (which then needs "
                        "--data.allow_instruction_data=true)")  # fmt: skip


def _chars_per_token(meta: dict[str, Any]) -> float | None:
    """Characters per token (to state the floor distance per char too): the corpus's bytes per
    token, which for ASCII text such as the built-in stories are characters."""
    return meta.get("bytes_per_token")


# The fields of a model's shape that a Hugging Face config.json decides.
HF_SHAPE_KEYS = ("block", "n_layers", "dim", "n_heads", "n_kv_heads", "ffn_hidden",
                 "max_context", "tie_embeddings", "rope_theta", "norm_eps", "qk_norm",
                 "canon")  # fmt: skip


def _is_hf_folder(path: str) -> bool:
    from lmforge.export import is_hf_folder

    return is_hf_folder(path)


def _shape_from_hf(
    m: ModelConfig, folder: Path, meta: dict[str, Any]
) -> tuple[ModelConfig, list[str]]:
    """The run's model config when `train.init_from` is a Hugging Face folder: its shape (layers,
    width, heads, FFN, RoPE, norms, tying, positions) from the folder's config.json, what
    `config_from_hf` cannot represent refused in one line. The run keeps its own training-time
    fields (context, dropout, init_std, pad_vocab_multiple: the padded rows hold the chat
    tokens) and the data's vocab_size.

    A model field that the config sets (it differs from the preset's value, so a YAML file or a
    --model.KEY override set it) and that disagrees with the folder is refused in one line,
    never silently replaced; a field left at the preset's value is the folder's. The context is
    lowered to the folder's max_context when the preset's is longer.
    """
    from lmforge.export import CONFIG_FILE, LMFORGE_KEY, config_from_hf, read_hf_config
    from lmforge.tokenizers import check_same_tokenizer

    hf_json = read_hf_config(folder)
    hf = config_from_hf(hf_json, str(folder / CONFIG_FILE))
    preset = model_config(m.preset)

    def value(cfg: ModelConfig, key: str) -> Any:  # 0 means "the default" for these two
        return {"n_kv_heads": cfg.kv_heads, "ffn_hidden": cfg.hidden}.get(key, getattr(cfg, key))

    for key in HF_SHAPE_KEYS:
        set_here = getattr(m, key) != getattr(preset, key)
        if set_here and value(m, key) != value(hf, key):
            raise UserError(
                f"--train.init_from {folder}: its {CONFIG_FILE} gives model.{key}="
                f"{value(hf, key)} but the config sets model.{key}={value(m, key)}; drop that "
                "setting (the model's shape comes from the folder) or start from another folder"
            )
    exported = hf_json.get(LMFORGE_KEY) or {}  # a folder lmforge exported: its exact config
    # Its own padding for a folder lmforge wrote; the run's otherwise (spare rows: chat tokens).
    pad_multiple = hf.pad_vocab_multiple if exported.get("model") else m.pad_vocab_multiple
    rows = hf.padded_vocab  # the embedding rows of the folder's weights
    if m.vocab_size > rows or padded_vocab_size(m.vocab_size, pad_multiple) < rows:
        raise UserError(
            f"the data's tokenizer has {m.vocab_size} tokens and the model in {folder} has "
            f"{rows} embedding rows: not the same vocabulary; prepare the data with the "
            "model's own tokenizer"
        )
    theirs = exported.get("tokenizer")
    if isinstance(theirs, dict) and theirs:
        check_same_tokenizer(meta.get("tokenizer", {}), theirs, f"data.dir and {folder}")
    notes = [f"model shape from {folder / CONFIG_FILE}: {hf.block}, {hf.n_layers} layers x "
             f"{hf.dim}, {hf.n_heads} heads ({hf.kv_heads} kv), FFN {hf.hidden}"]  # fmt: skip
    context = m.context
    if context > hf.max_context:
        if m.context != preset.context:
            raise UserError(
                f"model.context={m.context} is longer than the {hf.max_context} positions of "
                f"the model in {folder}; lower model.context"
            )
        context = hf.max_context
        notes.append(f"model.context lowered to {context}, the folder's max_context")
    shape = {key: getattr(hf, key) for key in HF_SHAPE_KEYS}
    shaped = replace(m, **shape, context=context, pad_vocab_multiple=pad_multiple)
    validate_model(shaped)
    return shaped, notes


def _init_weights(model: Transformer, init_from: str) -> None:
    """`train.init_from`: a Hugging Face Llama / GPT-2 folder, or an lmforge checkpoint or run."""
    from lmforge.export import init_from_hf, is_hf_folder
    from lmforge.train.checkpoint import load_weights_into

    with torch.no_grad():
        if is_hf_folder(init_from):
            init_from_hf(model, init_from)
        else:
            load_weights_into(model, init_from)
