"""The optimizer of a run, built in one place from `OptimConfig`.

AdamW with weight decay on matrices only (nanoGPT's grouping by tensor rank), fused on CUDA and
CPU; or Muon (`torch.optim.Muon`'s algorithm, its matrices orthogonalised in batches:
`BatchedMuon` in muon.py) for the 2-D hidden weights plus AdamW for embeddings, head, norms and
canon filters. Each param group carries `lr_scale`: the schedule sets
`lr = lr_at(step) * lr_scale`, so Muon's own rate follows the same warmup and decay.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lmforge.config import OptimConfig
from lmforge.errors import UserError


def build_optimizer(
    model: nn.Module, optim: OptimConfig | None = None, device: torch.device | None = None
) -> list[torch.optim.Optimizer]:
    """The run's optimizers (one, or AdamW + Muon) over the model's trainable parameters."""
    o = optim or OptimConfig()
    params = [p for p in model.parameters() if p.requires_grad]
    # Fused AdamW: one kernel a tensor instead of a dozen. On a CPU too (nanoGPT fuses on CUDA
    # only): at nanoGPT's shape the step is 0.9 ms fused against 5.0 ms, a tenth of a training step.
    fused = device is not None and device.type in ("cuda", "cpu")
    if o.name != "muon":
        return [_adamw(params, o, fused)]
    if not hasattr(torch.optim, "Muon"):
        raise UserError(
            f"optim.name=muon needs torch.optim.Muon (torch 2.9 or newer; this is torch "
            f"{torch.__version__}): upgrade torch, or use --optim.name=adamw"
        )
    from lmforge.train.muon import BatchedMuon  # subclasses torch.optim.Muon: torch >= 2.9

    not_matrices = {  # tables, and canon layers' per-channel filters: 2-D but no matrices
        id(p)
        for n, p in model.named_parameters()
        if n.startswith(("wte.", "wpe.", "lm_head.")) or ".canon." in n
    }
    hidden = [p for p in params if p.dim() == 2 and id(p) not in not_matrices]
    rest = [p for p in params if p.dim() != 2 or id(p) in not_matrices]
    muon = BatchedMuon(
        hidden,
        lr=o.muon_lr,
        momentum=o.muon_momentum,
        weight_decay=0.0,
        adjust_lr_fn="match_rms_adamw",
    )
    muon.param_groups[0]["lr_scale"] = o.muon_lr / o.lr
    return [_adamw(rest, o, fused), muon]


def _adamw(params: list[nn.Parameter], o: OptimConfig, fused: bool) -> torch.optim.AdamW:
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": o.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=fused or None
    )
