"""Learning-rate schedules as one pure function of the step (so a resumed run needs no state)."""

from __future__ import annotations

import math


def lr_at(
    step: int,
    *,
    kind: str,
    lr: float,
    min_lr: float,
    warmup_steps: int,
    max_steps: int,
    decay_steps: int = 0,
    wsd_decay_fraction: float = 0.2,
) -> float:
    """The learning rate of optimizer step `step` (0-based).

    cosine: linear warmup to `lr`, then cosine down to `min_lr` over `decay_steps` (default
    max_steps), then `min_lr`. constant: warmup, then `lr`. wsd (warmup-stable-decay): warmup,
    `lr` until the last `wsd_decay_fraction` of max_steps, then linear down to `min_lr`.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if kind == "constant":
        return lr
    if kind == "cosine":
        end = decay_steps or max_steps
        if step >= end or end <= warmup_steps:
            return min_lr
        progress = (step - warmup_steps) / (end - warmup_steps)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
    if kind == "wsd":
        decay_start = wsd_decay_start(warmup_steps, max_steps, wsd_decay_fraction)
        if step < decay_start:
            return lr
        progress = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
        return lr + progress * (min_lr - lr)
    raise ValueError(f"unknown schedule kind {kind!r}")


def wsd_decay_start(warmup_steps: int, max_steps: int, wsd_decay_fraction: float) -> int:
    """The first step of a wsd schedule's decay: the rate is held at its peak until then."""
    return max(warmup_steps, int(max_steps * (1 - wsd_decay_fraction)))
