"""Parameter counts by part, training-memory estimate and FLOPs per token (`lmforge model-info`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from lmforge.config import ModelConfig
from lmforge.loss import default_chunk_tokens
from lmforge.model import Transformer

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def build_unset(cfg: ModelConfig) -> Transformer:
    """The model for its shapes and counts, at any size, instantly: its weights are left
    uninitialised (empty tensors: memory is reserved, never touched). Not torch's meta device:
    every op on it goes through torch's compiler, whose import alone costs 2.4 s of a start."""
    skipped = ("normal_", "uniform_", "kaiming_uniform_", "ones_", "zeros_", "trunc_normal_")
    saved = {name: getattr(torch.nn.init, name) for name in skipped}
    try:
        for name in skipped:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        return Transformer(cfg)
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def parameter_parts(cfg: ModelConfig) -> dict[str, int]:
    """Parameters by part: embedding, positions, attention, canon, ffn, norms, untied head."""
    parts = {"embedding": 0, "positions": 0, "attention": 0, "ffn": 0, "norms": 0, "lm_head": 0}
    if cfg.canon:
        parts["canon"] = 0
    model = build_unset(cfg)
    for name, p in model.named_parameters():  # a tied head is the embedding: counted once
        if name.startswith("wte."):
            parts["embedding"] += p.numel()
        elif name.startswith("wpe."):
            parts["positions"] += p.numel()
        elif name.startswith("lm_head."):
            parts["lm_head"] += p.numel()
        elif ".attn." in name and "norm" not in name:
            parts["attention"] += p.numel()
        elif ".canon." in name:
            parts["canon"] += p.numel()
        elif ".ffn." in name:
            parts["ffn"] += p.numel()
        else:
            parts["norms"] += p.numel()
    return parts


def count_parameters(cfg: ModelConfig, padded: bool = False) -> int:
    """Total parameters with the real vocabulary (padded=False) or the padded one."""
    if not padded:
        cfg = dataclasses.replace(cfg, pad_vocab_multiple=1)
    return sum(parameter_parts(cfg).values())


def flops_per_token(cfg: ModelConfig, context: int | None = None) -> int:
    """Training FLOPs per token: 6*N + 12*L*d*T (PaLM appendix B, as nanoGPT counts).

    N is every parameter except the learned position table (it costs a lookup, not a matmul).
    """
    from lmforge.monitor.metrics import flops_per_token as palm_flops

    n = count_parameters(cfg, padded=True) - cfg.max_context * cfg.dim * (cfg.block == "gpt2")
    return palm_flops(n, cfg.n_layers, cfg.dim, context or cfg.context)


@dataclass
class MemoryEstimate:
    params: int
    grads: int
    adam_moments: int
    activations: int
    activations_checkpointed: int
    logits_plain: int
    logits_chunked: int

    @property
    def total_chunked(self) -> int:
        return self.params + self.grads + self.adam_moments + self.activations + self.logits_chunked

    @property
    def total_plain(self) -> int:
        return self.params + self.grads + self.adam_moments + self.activations + self.logits_plain


def training_memory(
    cfg: ModelConfig, batch: int, context: int, dtype: str = "fp32", chunk_tokens: int | None = None
) -> MemoryEstimate:
    """Bytes for one training step with AdamW (an estimate: the allocator and kernels add some).

    Weights, grads and both Adam moments are fp32 (mixed precision keeps fp32 masters).
    Activations per block, saved for backward (Korthikanti et al. 2022, no recompute): about
    B*T*(c_attn*C + c_ffn*F) values in the compute dtype, plus attention score memory that SDPA's
    fused kernels avoid. Logits: plain = B*T*V fp32 for the logits plus as much for their
    gradient/softmax; chunked = one chunk of each.
    """
    n = count_parameters(cfg, padded=True)
    a = BYTES[dtype]
    tokens = batch * context
    C, F, L, V = cfg.dim, cfg.hidden, cfg.n_layers, cfg.padded_vocab
    # Saved tensors per block: norm inputs/outputs, q, k, v, attention out, ffn in/hidden/out.
    ffn_factor = 3 if cfg.block == "llama" else 2  # SwiGLU keeps gate, up and their product
    per_block = tokens * (10 * C + ffn_factor * F) * a
    activations = L * per_block + tokens * C * a * 3  # + embeddings and the final norm
    checkpointed = L * tokens * C * a + per_block + tokens * C * a * 3  # block inputs + one block
    return MemoryEstimate(
        params=4 * n,
        grads=4 * n,
        adam_moments=8 * n,
        activations=activations,
        activations_checkpointed=checkpointed,
        logits_plain=2 * tokens * V * 4,
        logits_chunked=3 * min(tokens, chunk_tokens or default_chunk_tokens(V)) * V * 4,
    )


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f}"


def model_info_text(name: str, cfg: ModelConfig, batch: int, context: int, dtype: str) -> str:
    parts = parameter_parts(dataclasses.replace(cfg, pad_vocab_multiple=1))
    real, padded = count_parameters(cfg), count_parameters(cfg, padded=True)
    mem = training_memory(cfg, batch, context, dtype)
    kv = f", {cfg.kv_heads} kv heads" if cfg.kv_heads != cfg.n_heads else ""
    lines = [
        f"model {name}: {cfg.block} block, {cfg.n_layers} layers x {cfg.dim} dim, {cfg.n_heads} "
        f"heads{kv}, ffn {cfg.hidden}{f', canon {cfg.canon}' if cfg.canon else ''}, "
        f"context {cfg.context}, "
        f"{'tied' if cfg.tie_embeddings else 'untied'} head",
        f"vocab {cfg.vocab_size:,} (padded to {cfg.padded_vocab:,})",
        f"parameters: {real:,} (with padded vocab: {padded:,})",
    ]
    for part, count in parts.items():
        if count:
            lines.append(f"  {part:<11} {count:>14,}  {100 * count / real:5.1f} %")
    lines += [
        f"FLOPs per token (training, context {context}): {flops_per_token(cfg, context):,}",
        f"training memory estimate (batch {batch} x {context}, {dtype} activations, AdamW):",
        f"  params        {human_bytes(mem.params):>12}",
        f"  grads         {human_bytes(mem.grads):>12}",
        f"  AdamW moments {human_bytes(mem.adam_moments):>12}",
        f"  activations   {human_bytes(mem.activations):>12}"
        f"   (with activation checkpointing: {human_bytes(mem.activations_checkpointed)})",
        f"  logits        {human_bytes(mem.logits_chunked):>12}   chunked loss"
        f"   (plain: {human_bytes(mem.logits_plain)})",
        f"  total         {human_bytes(mem.total_chunked):>12}   chunked loss"
        f"   (plain: {human_bytes(mem.total_plain)})",
    ]
    return "\n".join(lines)


def model_summary(cfg: ModelConfig) -> str:
    """One line: '597,120 parameters (llama, 4x96, 6 heads, context 256, vocab 51 padded to 64)'."""
    heads = f"{cfg.n_heads} heads" + (
        f" ({cfg.kv_heads} kv)" if cfg.kv_heads != cfg.n_heads else ""
    )
    canon = f", canon {cfg.canon}" if cfg.canon else ""
    return (
        f"{count_parameters(cfg):,} parameters ({cfg.block}, {cfg.n_layers}x{cfg.dim}, {heads}"
        f"{canon}, context {cfg.context}, vocab {cfg.vocab_size} padded to {cfg.padded_vocab})"
    )
