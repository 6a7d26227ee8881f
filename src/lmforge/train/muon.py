"""Muon with the matrices of one shape orthogonalised in one batched product.

Its own module because it subclasses `torch.optim.Muon` (torch 2.9 or newer): `optim.py` imports
it only when a run asks for Muon.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch.optim._muon import _adjust_lr


class BatchedMuon(torch.optim.Muon):
    """`torch.optim.Muon` with the matrices of one shape orthogonalised together.

    The same update as torch's (momentum, Nesterov, the same quintic Newton-Schulz iteration in
    bf16, the same learning-rate adjustment and decay) and the same state, so checkpoints move
    between the two. torch runs the iteration one matrix at a time: 5 steps of 3 small matrix
    products each, per matrix; at a small model's widths the calls, not the arithmetic, cost the
    time (the demo's 28 matrices: 23 ms of an 80 ms CPU step). Here the matrices of one shape
    (after turning tall ones wide, as torch does) are stacked and iterated with batched products:
    two stacks for a Llama block, whatever its depth.
    """

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, bufs = [], [], []
            self._init_group(group, params, grads, bufs)
            if not params:
                continue
            momentum, lr = group["momentum"], group["lr"]
            torch._foreach_lerp_(bufs, grads, 1 - momentum)
            updates = torch._foreach_lerp(grads, bufs, momentum) if group["nesterov"] else bufs
            stacks: dict[tuple[int, int], list[int]] = defaultdict(list)
            for i, u in enumerate(updates):
                rows, cols = u.shape
                stacks[(min(rows, cols), max(rows, cols))].append(i)
            for members in stacks.values():
                wide = [updates[i].mT if updates[i].shape[0] > updates[i].shape[1] else updates[i]
                        for i in members]  # fmt: skip
                ortho = newton_schulz(
                    torch.stack(wide), group["ns_coefficients"], group["ns_steps"], group["eps"]
                )
                for i, o in zip(members, ortho, strict=True):
                    p = params[i]
                    p.mul_(1 - lr * group["weight_decay"])
                    p.add_(o.mT if p.shape[0] > p.shape[1] else o,
                           alpha=-_adjust_lr(lr, group["adjust_lr_fn"], p.shape))  # fmt: skip
        return loss


def newton_schulz(
    x: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float
) -> torch.Tensor:
    """torch.optim.Muon's quintic Newton-Schulz iteration on a stack of wide matrices (n, r, c),
    r <= c, in bf16: each matrix scaled to unit Frobenius norm, then X <- aX + (bA + cA^2)X with
    A = XX^T. Returns the (n, r, c) near-orthogonal stack."""
    a, b, c = coefficients
    x = x.bfloat16()
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        gram_update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, gram_update, x, beta=a)
    return x
