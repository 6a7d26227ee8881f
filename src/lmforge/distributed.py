"""One machine to many, through PyTorch's own engine: torchrun + DDP (default) or FSDP2.

`torchrun --nproc_per_node=N -m lmforge train ...` sets RANK / WORLD_SIZE / LOCAL_RANK; `setup()`
reads them, joins the process group (nccl on CUDA, gloo on CPU) and tells the trainer which rank
it is. Only rank 0 logs, samples, plots and writes files. Checkpoints hold full (unsharded) state,
so a run saved on N processes resumes on M.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn

from lmforge.errors import PeerFailed, UserError

T = TypeVar("T")


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    strategy: str = "none"  # none | ddp | fsdp
    backend: str = ""  # nccl | gloo, once in a process group

    @property
    def enabled(self) -> bool:
        """In a process group: launched by torchrun, with one process or many."""
        return self.strategy != "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, values: list[float], device: torch.device) -> list[float]:
        """Sum a few numbers over ranks (one small collective per call)."""
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    @property
    def device(self) -> torch.device:
        """Where this rank's collectives run: its GPU under nccl, else the CPU."""
        if self.backend == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")


def agree(d: Dist, work: Callable[[], T]) -> T:
    """Run `work` on every rank; if it raises a UserError on any rank, every rank stops (the
    ranks that failed with their own message, the others with PeerFailed) instead of the others
    waiting forever at the next collective."""
    if not d.enabled:
        return work()
    error, result = None, None
    try:
        result = work()
    except UserError as e:
        error = e
    failed = d.all_reduce_sum([float(error is not None)], d.device)[0]
    if error is not None:
        raise error
    if failed:
        raise PeerFailed("stopped: another rank refused the run (see its message)")
    return result  # type: ignore[return-value]


def setup(strategy: str = "ddp", device_type: str | None = None) -> Dist:
    """Join the process group when launched by torchrun (even with one process, so that
    `--nproc_per_node=1` runs the same DDP/FSDP and NCCL code as eight); a plain run is alone."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Dist()
    world_size = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = (device_type or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return Dist(rank, world_size, local_rank, strategy, dist.get_backend())


def teardown(together: bool = True) -> None:
    """Leave the process group. After a normal end the ranks leave together: one that exits while
    another still talks to it can abort the other (gloo: "terminate called without an active
    exception"). After an error, no barrier: the other ranks may never reach it."""
    if dist.is_available() and dist.is_initialized():
        try:
            if together:
                dist.barrier()
        finally:
            dist.destroy_process_group()


def wrap(model: nn.Module, d: Dist, device: torch.device, dtype: str = "fp32") -> nn.Module:
    """DDP (every rank holds the model, gradients are averaged) or FSDP2 (`fully_shard`: each
    rank holds a shard of every block, gathered for compute; for models that do not fit one GPU).
    """
    if not d.enabled:
        return model
    if d.strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy()
        if dtype in ("bf16", "fp16"):
            half = torch.bfloat16 if dtype == "bf16" else torch.float16
            policy = MixedPrecisionPolicy(param_dtype=half, reduce_dtype=torch.float32)
        for block in model.blocks:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def no_grad_sync(model: nn.Module, d: Dist, last_micro_step: bool):
    """Gradient accumulation without needless all-reduces: sync only on the last micro-step."""
    if not d.enabled or last_micro_step:
        if d.strategy == "fsdp" and d.enabled:
            model.set_requires_gradient_sync(True)
        return contextlib.nullcontext()
    if d.strategy == "fsdp":
        model.set_requires_gradient_sync(False)
        return contextlib.nullcontext()
    return model.no_sync()


def full_state(model: nn.Module, optimizers: list[torch.optim.Optimizer], d: Dist):
    """Unsharded model and optimizer state, keyed by parameter names, the same whether the run is
    plain, DDP or FSDP2, so any world size can load it. Under FSDP every rank must call it.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=d.enabled)
    model_state = get_model_state_dict(model, options=options)
    optim_states = [get_optimizer_state_dict(model, opt, options=options) for opt in optimizers]
    return model_state, optim_states


def load_full_state(
    model: nn.Module,
    optimizers: list[torch.optim.Optimizer],
    model_state: dict,
    optim_states: list[dict],
) -> None:
    """Load state saved by `full_state` on any world size (FSDP2 keeps each rank's shard)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    for opt, state in zip(optimizers, optim_states):
        set_optimizer_state_dict(model, opt, state, options=options)
