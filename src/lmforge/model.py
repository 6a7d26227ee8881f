"""The transformer: Llama-style blocks (RMSNorm, RoPE, SDPA attention, SwiGLU) or GPT-2 blocks.

Read top to bottom: norms and rotary embeddings, the two attention variants, the two feed-forwards,
the blocks, the model (forward with a chunked loss), then generation with a KV cache.
Shapes in comments: B batch, T time, H heads, K key/value heads, D head dim, C model width.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lmforge.chat_format import IGNORE_INDEX
from lmforge.config import ModelConfig
from lmforge.loss import chunked_cross_entropy


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and x.device.type == "cpu":
            return _CPURMSNorm.apply(x, self.weight, self.eps)
        # Normalise in fp32 (as Llama does): bf16 squares lose too much precision.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x)
        return normed * self.weight


class _CPURMSNorm(torch.autograd.Function):
    """RMSNorm in fp32 on a CPU with a hand-written backward: the same math as F.rms_norm, at half
    its cost. PyTorch's CPU rms_norm is a chain of small ops whose autograd graph doubles them
    (forward + backward of a (12, 64, 128) input: 1.8 ms against 0.9 ms here, where LayerNorm's
    fused kernel takes 0.4 ms), and a llama step at nanoGPT's shape runs nine of them."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(eps))  # (..., 1)
        normed = x * rstd
        ctx.save_for_backward(normed, rstd, weight)
        return normed * weight

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        normed, rstd, weight = ctx.saved_tensors
        g = grad * weight
        # d normed / dx = rstd * (I - normed normed^T / C)
        grad_x = (g - normed * (g * normed).mean(-1, keepdim=True)) * rstd
        grad_weight = (grad * normed).reshape(-1, normed.shape[-1]).sum(0)
        return grad_x, grad_weight, None


def rope_tables(head_dim: int, positions: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of every (position, frequency), no learned parameters. Each (positions, D)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(positions, dtype=torch.float32), inv_freq)
    angles = torch.cat([freqs, freqs], dim=-1)  # halves layout, as Hugging Face Llama
    return angles.cos(), angles.sin()


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin with its first half negated: rotate_half(x) * sin == x.roll(D/2) * signed_sin(sin)."""
    half = sin.shape[-1] // 2
    return torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """RoPE with the sign of rotate_half folded into the table: x * cos + rotate_half(x) * sin,
    where rotate_half(x) = cat(-x2, x1). One roll and one addcmul instead of a neg, a cat, two
    muls and an add: half the time of the plain form on a CPU (forward + backward)."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin_signed).type_as(x)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., D) rotated by tables cos/sin broadcastable to it (Hugging Face's halves layout)."""
    return rotate(x, cos, signed_sin(sin))


class KVCache:
    """Keys and values of past positions, per layer, grown in place during generation."""

    def __init__(self, n_layers: int, max_len: int):
        self.n_layers, self.max_len = n_layers, max_len
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers
        self.length = 0  # positions already stored (same for every layer after a full forward)
        self.canon: list[torch.Tensor | None] = [None] * n_layers  # last inputs of canon layers

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        # k, v (B, K, T, D) -> all keys/values so far (B, K, length + T, D)
        if self.keys[layer] is None:
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.keys[layer] = k.new_zeros(shape)
            self.values[layer] = v.new_zeros(shape)
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


SMALL_CONTEXT = 128  # up to this many positions, bf16 causal attention on a CPU: two products


def _small_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention as scores, softmax (fp32) and a weighted sum: a CPU in bf16, T <= 128.

    With so few positions the score matrix (B x H x T x T) is small, and under bf16 autocast
    the two products run in bf16, at twice the fp32 speed of this CPU's matmuls, where SDPA's
    flash kernel would have to run in fp32 (see `_attention`). A/B in one process at nanoGPT's
    shape, tokens/s against the benchmark's plain fp32 loop (SDPA -> this): llama block bf16
    0.99 -> 1.03 and 0.96 -> 1.00, gpt2 bf16 1.22 -> 1.31. In fp32, flash is the faster
    (bench/cpu_attention.py --parts small), and from T = 256 in both precisions.
    q, k, v (B, H, T, D) -> (B, H, T, D)."""
    B, H, T, D = q.shape
    future = torch.full((T, T), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)
    q, k, v = (t.reshape(B * H, T, D) for t in (q, k, v))
    scores = torch.baddbmm(future, q, k.transpose(1, 2), alpha=D**-0.5)  # (B*H, T, T)
    probs = scores.float().softmax(-1).to(scores.dtype)
    return torch.bmm(probs, v).view(B, H, T, D)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """Causal bf16 attention of up to 128 positions on a CPU: `_small_causal_attention`.
    Otherwise SDPA; on a CPU in fp32 even under bf16 autocast, cast back to the caller's dtype.

    PyTorch's CPU flash-attention kernel is slower in bf16 than in fp32 at small head sizes
    (forward + backward, B x H x T x D: 4 x 6 x 256 x 16 takes 8.7 ms in bf16, 4.3 ms in fp32;
    16 x 6 x 256 x 16 32.7 ms against 19.4 ms; equal at D 64; bench/cpu_attention.py), and at the
    demo's shape attention is a third of a training step. fp32 is also the more exact of the two.
    """
    if (
        q.device.type == "cpu"
        and q.dtype != torch.float32
        and kwargs.get("is_causal")
        and not kwargs.get("dropout_p")
        and q.shape[-2] == k.shape[-2] <= SMALL_CONTEXT
    ):
        return _small_causal_attention(q, k, v)
    if q.device.type != "cpu" or q.dtype == torch.float32:
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    with torch.autocast("cpu", enabled=False):
        y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kwargs)
    return y.to(q.dtype)


class Attention(nn.Module):
    """Causal multi-head attention. llama: separate q/k/v, RoPE, optional GQA and QK-norm, no
    biases. gpt2: one fused qkv projection with biases, positions come from learned embeddings."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.block = layer, cfg.block
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.dropout = cfg.dropout
        if cfg.block == "llama":
            self.wq = nn.Linear(cfg.dim, self.n_heads * self.head_dim, bias=False)
            self.wk = nn.Linear(cfg.dim, self.n_kv * self.head_dim, bias=False)
            self.wv = nn.Linear(cfg.dim, self.n_kv * self.head_dim, bias=False)
            self.wo = nn.Linear(self.n_heads * self.head_dim, cfg.dim, bias=False)
            self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None
            self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        else:
            self.c_attn = nn.Linear(cfg.dim, 3 * cfg.dim, bias=cfg.bias)
            self.c_proj = nn.Linear(cfg.dim, cfg.dim, bias=cfg.bias)

    def forward(self, x, rope, mask, cache: KVCache | None) -> torch.Tensor:
        B, T, C = x.shape
        if self.block == "llama":
            q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
            k = self.wk(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, K, T, D)
            v = self.wv(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = rotate(q, *rope), rotate(k, *rope)  # rope: cos, signed sin (B|1, 1, T, D)
        else:
            q, k, v = (
                t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
                for t in self.c_attn(x).split(C, dim=2)
            )
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        if self.n_kv != self.n_heads:  # GQA: each key/value head serves n_heads / n_kv queries
            k = k.repeat_interleave(self.n_heads // self.n_kv, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv, dim=1)
        # SDPA picks FlashAttention / memory-efficient kernels on CUDA when it can.
        y = _attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None and T > 1,
            dropout_p=self.dropout if self.training else 0.0,
        )
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, C)
        return self.wo(y) if self.block == "llama" else self.c_proj(y)


class Canon(nn.Module):
    """A causal depthwise convolution over time, added to its input: ``h[t] + sum_j w[j] h[t-j]``.

    A "canon layer" (Allen-Zhu, *Physics of Language Models, part 4.1*), here on each block's
    attention input.  Every position then carries the few tokens before it, so a single attention
    layer can match a key by its preceding characters: what a small char-level model needs to find
    a word of its context and copy it.  Mixing stops where attention does (at padding, and at the
    boundaries of packed examples); with a KV cache the last ``width - 1`` inputs are kept.
    """

    def __init__(self, dim: int, width: int):
        super().__init__()
        self.width = width
        self.weight = nn.Parameter(torch.empty(width, dim))  # weight[j] scales h[t - j]

    def forward(
        self, h: torch.Tensor, walls: CanonWalls, cache: KVCache | None, layer: int
    ) -> torch.Tensor:
        B, T, C = h.shape
        keep_now, same_doc = walls
        src = h if keep_now is None else h * keep_now.to(h.dtype)  # padding contributes nothing
        past = cache.canon[layer] if cache is not None else None
        if past is None:
            past = src.new_zeros(B, self.width - 1, C)  # before the first token: nothing
        ext = torch.cat([past, src], dim=1)  # (B, width - 1 + T, C)
        if cache is not None:
            cache.canon[layer] = ext[:, ext.shape[1] - (self.width - 1) :]
        weight = self.weight.to(h.dtype)  # h's dtype: a bf16 model stays in bf16
        out = h
        for j in range(self.width):
            term = ext[:, self.width - 1 - j : self.width - 1 - j + T] * weight[j]
            if same_doc is not None and j > 0:
                term = term * same_doc[j - 1].to(h.dtype)  # h[t-j] of another example: no
            out = out + term
        return out


# (multiplier of each position's own input: 0 at padding, or None) and (per shift j >= 1, a
# (B, T, 1) multiplier: 0 where t - j lies in another packed example, or None): see canon_walls.
CanonWalls = tuple[torch.Tensor | None, list[torch.Tensor] | None]


def canon_walls(
    width: int, past: int, T: int, doc_ids: torch.Tensor | None, key_valid: torch.Tensor | None
) -> CanonWalls:
    """Where canon layers must not mix positions: the same walls ``attention_mask`` builds."""
    if width == 0:
        return None, None
    keep_now = None
    if key_valid is not None:
        keep_now = key_valid[:, past : past + T, None].float()
    same_doc = None
    if doc_ids is not None and width > 1:
        padded = F.pad(doc_ids, (width - 1, 0), value=-1)
        same_doc = [
            (padded[:, width - 1 - j : width - 1 - j + T] == doc_ids)[..., None].float()
            for j in range(1, width)
        ]
    return keep_now, same_doc


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden, bias=False)  # gate
        self.w3 = nn.Linear(cfg.dim, cfg.hidden, bias=False)  # up
        self.w2 = nn.Linear(cfg.hidden, cfg.dim, bias=False)  # down (a residual projection)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class GeluMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.dim, cfg.hidden, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.hidden, cfg.dim, bias=cfg.bias)
        # GPT-2's "gelu_new" (tanh), or the exact erf form (nanoGPT's nn.GELU)
        self.approximate = "tanh" if cfg.gelu == "tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        if cfg.block == "llama":
            self.norm1, self.norm2 = RMSNorm(cfg.dim, cfg.norm_eps), RMSNorm(cfg.dim, cfg.norm_eps)
            self.ffn: nn.Module = SwiGLU(cfg)
        else:
            self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps, bias=cfg.bias)
            self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps, bias=cfg.bias)
            self.ffn = GeluMLP(cfg)
        self.attn = Attention(cfg, layer)
        self.canon = Canon(cfg.dim, cfg.canon) if cfg.canon else None
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(
        self, x, rope, mask, cache: KVCache | None = None, walls: CanonWalls = (None, None)
    ) -> torch.Tensor:
        h = self.norm1(x)
        if self.canon is not None:
            h = self.canon(h, walls, cache, self.attn.layer)
        x = x + self.dropout(self.attn(h, rope, mask, cache))
        return x + self.dropout(self.ffn(self.norm2(x)))


RESIDUAL_PROJECTIONS = (
    "attn.wo.weight",
    "ffn.w2.weight",
    "attn.c_proj.weight",
    "ffn.c_proj.weight",
)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.activation_checkpointing = False
        self.wte = nn.Embedding(cfg.padded_vocab, cfg.dim)
        self.wpe = nn.Embedding(cfg.max_context, cfg.dim) if cfg.block == "gpt2" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm_f = (
            RMSNorm(cfg.dim, cfg.norm_eps)
            if cfg.block == "llama"
            else nn.LayerNorm(cfg.dim, eps=cfg.norm_eps, bias=cfg.bias)
        )
        self.lm_head = nn.Linear(cfg.dim, cfg.padded_vocab, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        if cfg.block == "llama":
            cos, sin = rope_tables(cfg.head_dim, cfg.max_context, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin_signed", signed_sin(sin), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """normal(0, std); residual projections std/sqrt(2*layers) (GPT-2); biases 0, norms 1."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                scale = (
                    1 / math.sqrt(2 * self.cfg.n_layers)
                    if name.endswith(RESIDUAL_PROJECTIONS)
                    else 1
                )
                nn.init.normal_(p, mean=0.0, std=std * scale)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.ones_(p)
        if (
            self.cfg.block == "llama"
        ):  # buffers are not parameters: rebuild after a meta-device init
            cos, sin = rope_tables(self.cfg.head_dim, self.cfg.max_context, self.cfg.rope_theta)
            self.rope_cos.copy_(cos)
            self.rope_sin_signed.copy_(signed_sin(sin))

    def rope(
        self, position_ids: torch.Tensor | None, past: int, T: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary tables for these positions: cos and signed sin, (B, 1, T, D), or
        (1, 1, T, D) for the plain positions past .. past + T - 1 (a slice, no gather)."""
        if position_ids is None:
            return (
                self.rope_cos[past : past + T][None, None],
                self.rope_sin_signed[past : past + T][None, None],
            )
        return self.rope_cos[position_ids][:, None], self.rope_sin_signed[position_ids][:, None]

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        key_valid: torch.Tensor | None = None,
        cache: KVCache | None = None,
        reduction: str = "mean",
        last_only: bool = False,
    ) -> torch.Tensor:
        """idx (B, T) token ids. With targets (B, T): the loss (chunked, -100 ignored). Without:
        logits (B, T, V) over the padded vocabulary, or (B, 1, V) with last_only.

        position_ids (B, T) restart per example in packed rows; doc_ids (B, T) forbid attention
        across packed examples; key_valid (B, past + T) marks real (non-padding) key positions.
        """
        B, T = idx.shape
        past = cache.length if cache is not None else 0
        x = self.wte(idx)  # (B, T, C)
        rope = None
        if self.wpe is not None:
            if position_ids is None:
                position_ids = torch.arange(past, past + T, device=idx.device).expand(B, T)
            x = x + self.wpe(position_ids)
        else:
            rope = self.rope(position_ids, past, T)
        x = self.drop(x)
        mask = attention_mask(T, past, idx.device, doc_ids, key_valid)
        walls = canon_walls(self.cfg.canon, past, T, doc_ids, key_valid)
        for block in self.blocks:
            if self.activation_checkpointing and self.training:
                x = checkpoint(block, x, rope, mask, None, walls, use_reentrant=False)
            else:
                x = block(x, rope, mask, cache, walls)
        if cache is not None:
            cache.length += T
        x = self.norm_f(x)
        if targets is not None:
            return chunked_cross_entropy(
                x, self.lm_head.weight, targets, reduction=reduction, ignore_index=IGNORE_INDEX
            )
        if last_only:
            x = x[:, -1:]
        return self.lm_head(x)

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Sequence[int]] | Sequence[int],
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float = 1.0,
        stop_tokens: Sequence[int] = (),
        seed: int | None = None,
        vocab_limit: int | None = None,
        pad_id: int = 0,
        on_token: Callable[[int, int], None] | None = None,
        use_cache: bool = True,
    ) -> list[list[int]]:
        """Sample continuations of one prompt or a batch of prompts (of any lengths).

        temperature 0 is greedy. `stop_tokens` end a row (the stop token is not returned).
        `vocab_limit` forbids ids at or above it (the padded, never-trained rows). `on_token(row,
        id)` streams each new token as it is chosen. Returns the new ids of each row.
        """
        single = len(prompts) > 0 and isinstance(prompts[0], int)
        rows = [list(prompts)] if single else [list(p) for p in prompts]
        if any(len(r) == 0 for r in rows):
            raise ValueError("generate() needs at least one prompt token per row")
        device = self.wte.weight.device
        context = self.cfg.context
        generator = torch.Generator(device=device)
        generator.manual_seed(seed if seed is not None else torch.seed())
        was_training = self.training
        self.eval()
        seqs = [list(r) for r in rows]
        outputs: list[list[int]] = [[] for _ in rows]
        finished = [False] * len(rows)
        stop = set(stop_tokens)
        cache: KVCache | None = None
        window = context
        for _ in range(max_new_tokens):
            if cache is None or cache.length >= context:
                # (Re)fill: left-pad the rows to one length; positions count real tokens only.
                # Past the context, a cached run keeps the newest half and fills again.
                idx, key_valid, positions = left_pad([s[-window:] for s in seqs], pad_id, device)
                if bool(key_valid.all()):
                    key_valid = None  # no padding: plain causal attention, the fast path
                cache = KVCache(self.cfg.n_layers, context) if use_cache else None
                window = context // 2 if use_cache else context
                logits = self(
                    idx, position_ids=positions, key_valid=key_valid, cache=cache, last_only=True
                )
            else:  # one new position per row, attending to everything cached
                idx = torch.tensor([[s[-1]] for s in seqs], device=device)
                positions = positions[:, -1:] + 1
                if key_valid is not None:
                    key_valid = torch.cat([key_valid, key_valid.new_ones(len(seqs), 1)], dim=1)
                logits = self(idx, position_ids=positions, key_valid=key_valid, cache=cache)
            next_ids = sample_next(
                logits[:, -1].float(),
                seqs,
                temperature,
                top_k,
                top_p,
                repetition_penalty,
                vocab_limit,
                generator,
            )
            for row, token in enumerate(next_ids.tolist()):
                seqs[row].append(token)
                if finished[row]:
                    continue
                if token in stop:
                    finished[row] = True
                    continue
                outputs[row].append(token)
                if on_token is not None:
                    on_token(row, token)
            if all(finished):
                break
        self.train(was_training)
        return outputs[0] if single else outputs


def attention_mask(
    T: int, past: int, device, doc_ids: torch.Tensor | None, key_valid: torch.Tensor | None
) -> torch.Tensor | None:
    """Boolean (B, 1, T, past+T) mask (True = may attend), or None for plain causal attention."""
    if doc_ids is None and key_valid is None and (past == 0 or T == 1):
        return None  # plain causal (is_causal), or one new query that may see every cached key
    q_pos = torch.arange(past, past + T, device=device)[:, None]
    k_pos = torch.arange(past + T, device=device)[None, :]
    mask = (k_pos <= q_pos)[None, None]  # (1, 1, T, past+T)
    if key_valid is not None:
        mask = mask & key_valid[:, None, None, :]
    if doc_ids is not None:  # packed rows: a token sees only its own example
        mask = mask & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
    if key_valid is not None:
        # A padding query row would see no key at all (NaN softmax): let it see itself.
        eye = torch.zeros_like(mask)
        eye[..., torch.arange(T), torch.arange(past, past + T)] = True
        mask = mask | eye
    return mask


def left_pad(rows: list[list[int]], pad_id: int, device):
    """Rows of different lengths -> ids (B, T), key_valid (B, T), position_ids (B, T)."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long, device=device)
    valid = torch.zeros((len(rows), length), dtype=torch.bool, device=device)
    for i, r in enumerate(rows):
        ids[i, length - len(r) :] = torch.tensor(r, device=device)
        valid[i, length - len(r) :] = True
    positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
    return ids, valid, positions


def sample_next(
    logits: torch.Tensor,
    seqs: list[list[int]],
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    repetition_penalty: float,
    vocab_limit: int | None,
    generator: torch.Generator,
) -> torch.Tensor:
    """One token per row from logits (B, V): penalty, temperature, top-k, top-p, then sample."""
    if vocab_limit is not None:
        logits[:, vocab_limit:] = float("-inf")
    if repetition_penalty != 1.0:  # CTRL-style: make tokens already present less likely
        for row, seq in enumerate(seqs):
            seen = torch.tensor(sorted(set(seq)), device=logits.device)
            picked = logits[row, seen]
            logits[row, seen] = torch.where(
                picked > 0, picked / repetition_penalty, picked * repetition_penalty
            )
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) > top_p  # keep the first token past p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
