"""Cross-entropy of the LM head without materialising the full logits.

At batch 32 x 1024 with 50,257 classes the logits alone are 6.5 GB in fp32, and autograd keeps them
(and their softmax) for backward. Here the head and the loss run over chunks of tokens: each chunk's
logits are computed, turned into its loss and its gradients at once, and freed, so peak memory holds
one chunk of logits. The gradients are exact (same formula as autograd's), stored for backward.
"""

from __future__ import annotations

import functools
import sys

import torch
import torch.nn.functional as F

from lmforge.chat_format import IGNORE_INDEX


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, ignore_index, vocab_limit):
        # hidden (N, d), weight (V, d), targets (N,). Returns the SUM of token losses.
        n_tokens = hidden.shape[0]
        compute_dtype = hidden.dtype
        w = weight.to(compute_dtype)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = (
            torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        )
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n_tokens, chunk_size):
            h = hidden[start : start + chunk_size]
            t = targets[start : start + chunk_size]
            logits = (h @ w.t()).float()  # (n, V): the only big tensor, one chunk at a time
            if vocab_limit is not None and vocab_limit < logits.shape[1]:
                logits[:, vocab_limit:] = float("-inf")
            valid = t != ignore_index
            safe_t = torch.where(valid, t, torch.zeros_like(t))
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, safe_t[:, None]).squeeze(1)
            total += ((lse - picked) * valid).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            # d(loss)/d(logits) = softmax - onehot, zero on ignored rows.
            grad_logits = torch.exp(logits - lse[:, None])
            grad_logits[torch.arange(len(t), device=t.device), safe_t] -= 1.0
            grad_logits *= valid[:, None]
            if grad_hidden is not None:
                grad_hidden[start : start + chunk_size] = grad_logits.to(compute_dtype) @ w
            if grad_weight is not None:
                grad_weight += grad_logits.t() @ h.float()
            del logits, grad_logits
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = grad_hidden * grad_output.to(grad_hidden.dtype) if grad_hidden is not None else None
        gw = (grad_weight * grad_output).to(ctx.weight_dtype) if grad_weight is not None else None
        return gh, gw, None, None, None, None


def default_chunk_tokens(vocab: int, budget: int = 2**25) -> int:
    """Tokens per chunk so one chunk of logits holds about `budget` values (128 MB in fp32)."""
    return max(128, budget // max(1, vocab))


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int | None = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    vocab_limit: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T` against `targets`, one chunk of tokens at a time.

    hidden (..., d), targets (...). `reduction="sum"` lets the caller normalise by the count of
    non-ignored tokens across micro-batches (instruction tuning). `vocab_limit` masks the padded
    vocabulary rows beyond it. Same loss and gradients as `plain_cross_entropy`.

    Kept out of torch.compile: its gradients are computed in forward, and once compiled on CUDA
    (torch 2.11, inductor) `ctx.needs_input_grad` read False there, so backward returned zeros
    and nothing trained. Eager costs one graph break at the head; the blocks stay compiled. The
    guard is made only once torch's compiler is loaded (`import torch._dynamo` costs 2.4 s of a
    CPU start, and nothing can be compiling before it is).
    """
    if "torch._dynamo" in sys.modules:
        return _outside_compile()(hidden, weight, targets, chunk_size, ignore_index, reduction,
                                  vocab_limit)  # fmt: skip
    return _chunked(hidden, weight, targets, chunk_size, ignore_index, reduction, vocab_limit)


@functools.cache
def _outside_compile():
    return torch.compiler.disable(_chunked)


def _chunked(hidden, weight, targets, chunk_size, ignore_index, reduction, vocab_limit):
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    chunk_size = chunk_size or default_chunk_tokens(weight.shape[0])
    total = _ChunkedLinearCrossEntropy.apply(
        hidden, weight, targets, chunk_size, ignore_index, vocab_limit
    )
    if reduction == "sum":
        return total
    count = (targets != ignore_index).sum().clamp(min=1)
    return total / count


def plain_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
) -> torch.Tensor:
    """The reference: full logits, then F.cross_entropy (what the chunked version must equal)."""
    logits = hidden.reshape(-1, hidden.shape[-1]) @ weight.t()
    return F.cross_entropy(
        logits.float(), targets.reshape(-1), ignore_index=ignore_index, reduction=reduction
    )
