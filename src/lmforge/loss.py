"""Cross-entropy of the LM head without materialising the full logits.

At batch 32 x 1024 with 50,257 classes the logits alone are 6.5 GB in fp32, and autograd keeps them
(and their softmax) for backward. Here the head and the loss run over chunks of tokens: each chunk's
logits are computed, turned into its loss and its gradients at once, and freed, so peak memory holds
one chunk of logits. The gradients are exact (same formula as autograd's), stored for backward.

Two implementations of the same formula; `chunked_cross_entropy` picks one:
* eager (`_ChunkedLinearCrossEntropy`, an autograd.Function): the fastest when nothing compiles.
* traceable (`traceable_chunked_cross_entropy`, plain tensor ops): what runs while torch.compile
  traces the model, so the head is compiled and fused with the blocks instead of breaking the graph.
"""

from __future__ import annotations

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

    While torch.compile traces the caller, this is `traceable_chunked_cross_entropy`; otherwise
    the autograd.Function. The Function is never traced: compiled on CUDA (torch 2.11, inductor)
    its `ctx.needs_input_grad` read False in forward, so backward returned zeros and nothing
    trained. (`torch.compiler.is_compiling` needs no `import torch._dynamo`, which costs 2.4 s
    of a CPU start.)
    """
    if torch.compiler.is_compiling():
        return traceable_chunked_cross_entropy(
            hidden, weight, targets, chunk_size, ignore_index, reduction, vocab_limit
        )
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    chunk_size = chunk_size or default_chunk_tokens(weight.shape[0])
    total = _ChunkedLinearCrossEntropy.apply(
        hidden, weight, targets, chunk_size, ignore_index, vocab_limit
    )
    return _reduce(total, targets, ignore_index, reduction)


def traceable_chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int | None = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    vocab_limit: int | None = None,
) -> torch.Tensor:
    """`chunked_cross_entropy` in ops that torch.compile traces and fuses (what it runs there).

    The same forward as the eager Function: per chunk, the logits, the loss, and at once the
    gradients (softmax - onehot) @ w and (softmax - onehot).T @ h, on detached tensors, so that
    one chunk of logits is alive at a time and nothing of them is kept for backward. The
    gradients then reach autograd through `_with_gradient`: a term whose value is exactly 0 and
    whose derivative is the gradient computed here. No custom autograd.Function, so nothing
    depends on how the compiler fills its `ctx`.

    Why not `checkpoint` around each chunk's ordinary loss: the head would be computed twice
    (forward, then again in backward), 4 matmuls of the size of the head against 3 here, and
    checkpoint in an unrolled loop leaves to the compiler's partitioner whether only one chunk
    of logits is alive; here the program says so.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])  # (N, d)
    targets = targets.reshape(-1)  # (N,)
    chunk_size = chunk_size or default_chunk_tokens(weight.shape[0])
    grad_on = torch.is_grad_enabled()
    want_hidden, want_weight = grad_on and hidden.requires_grad, grad_on and weight.requires_grad
    compute_dtype = hidden.dtype
    h_all, w = hidden.detach(), weight.detach().to(compute_dtype)
    columns = torch.arange(weight.shape[0], device=hidden.device)  # (V,)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden_chunks: list[torch.Tensor] = []
    grad_weight: torch.Tensor | None = None
    for start in range(0, hidden.shape[0], chunk_size):
        h = h_all[start : start + chunk_size]
        t = targets[start : start + chunk_size]
        logits = (h @ w.t()).float()  # (n, V): the only big tensor, one chunk at a time
        if vocab_limit is not None and vocab_limit < logits.shape[1]:
            logits = logits.masked_fill(columns >= vocab_limit, float("-inf"))
        valid = t != ignore_index
        safe_t = torch.where(valid, t, torch.zeros_like(t))
        lse = torch.logsumexp(logits, dim=-1)
        picked = logits.gather(1, safe_t[:, None]).squeeze(1)
        total = total + ((lse - picked) * valid).sum()
        if not (want_hidden or want_weight):
            continue
        # d(loss)/d(logits) = softmax - onehot, zero on ignored rows; one elementwise kernel.
        probs = torch.exp(logits - lse[:, None])
        is_target = columns == safe_t[:, None]  # (n, V)
        grad_logits = torch.where(is_target, probs - 1.0, probs) * valid[:, None]
        if want_hidden:
            grad_hidden_chunks.append(grad_logits.to(compute_dtype) @ w)
        if want_weight:
            part = grad_logits.t() @ h.float()  # bf16 under autocast: summed in fp32
            grad_weight = part.float() if grad_weight is None else grad_weight + part
    if grad_hidden_chunks:
        total = _with_gradient(total, hidden, torch.cat(grad_hidden_chunks))
    if grad_weight is not None:
        total = _with_gradient(total, weight, grad_weight)
    return _reduce(total, targets, ignore_index, reduction)


def _with_gradient(value: torch.Tensor, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """`value`, unchanged, plus d(value)/dx = grad (times whatever gradient arrives at value).

    `s - s.detach()` is exactly 0 in forward and has s's derivative, grad, in backward. s is
    summed in fp32, where a bf16 sum could overflow to inf and turn the 0 into NaN."""
    s = (x.float() * grad.float()).sum()
    return value + (s - s.detach())


def _reduce(
    total: torch.Tensor, targets: torch.Tensor, ignore_index: int, reduction: str
) -> torch.Tensor:
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
