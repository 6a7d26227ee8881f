"""The training loop: one Trainer for phase 1 (token files) and phase 2 (instruction batches).

Everything the loop needs to continue after a crash is in the checkpoint: model, optimizer(s),
gradient scaler, step, tokens seen, best validation loss, early-stopping count, the running log
average and the RNG state. Batches are a pure function of (seed, step, micro-step, rank), so the
resumed run reads exactly what the uninterrupted one would have read.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from lmforge import __version__
from lmforge.device import Precision, enable_tf32, pick
from lmforge.distributed import Dist, full_state, load_full_state, no_grad_sync
from lmforge.errors import UserError
from lmforge.loss import IGNORE_INDEX
from lmforge.train import checkpoint as ckpt
from lmforge.train.schedule import lr_at
from lmforge.train.signals import GracefulStop


class Diverged(UserError):
    """The loss became NaN or infinite."""


@dataclass
class TrainSettings:
    """What the loop does and when; the CLI fills it from the config, API users directly."""

    max_steps: int = 1000
    max_epochs: int = 0
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    lr: float = 3e-4
    min_lr: float = 3e-5
    schedule: str = "cosine"
    warmup_steps: int = 0
    decay_steps: int = 0
    wsd_decay_fraction: float = 0.2
    log_every: int = 10
    eval_every: int = 0
    eval_batches: int = 20
    save_every: int = 0
    save_every_minutes: float = 0.0
    keep_last: int = 5
    sample_every: int = 0
    patience: int = 0
    min_delta: float = 0.001
    warmup_passes: int = 0
    seed: int = 1337
    loss_normalisation: str = "mean"  # "tokens": sum over micro-batches / assistant tokens (SFT)
    entropy_floor: float | None = None
    flops_per_token: int = 0
    peak_flops: float | None = None
    progress: bool = False


@dataclass
class History:
    step: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    val_step: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_perplexity: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, list]:
        return {k: list(v) for k, v in self.__dict__.items()}


class Batches(ABC):
    """What the loop reads: `get(step, micro_step) -> dict` with `input_ids` and `labels` (B, T),
    optionally `position_ids`/`doc_ids`; `epoch_of(step)`. Adapters below wrap token files and
    DataLoaders."""

    @abstractmethod
    def get(self, step: int, micro_step: int) -> dict[str, torch.Tensor]:
        """The micro-batch at this position: a pure function of (step, micro_step)."""

    def epoch_of(self, step: int) -> int:
        return 0

    batches_per_epoch: int | None = None


class TokenFileBatches(Batches):
    """Wraps `lmforge.data.memmap.TokenBatches` (x, y) windows."""

    def __init__(self, token_batches: Any):
        self.inner = token_batches
        self.batches_per_epoch = getattr(token_batches, "batches_per_epoch", None)
        if token_batches.mode != "epoch":
            self.batches_per_epoch = None

    def get(self, step: int, micro_step: int) -> dict[str, torch.Tensor]:
        x, y = self.inner.get_batch(step, micro_step)
        return {"input_ids": x, "labels": y}

    def epoch_of(self, step: int) -> int:
        return self.inner.epoch_of(step) if self.inner.mode == "epoch" else 0


class LoaderBatches(Batches):
    """Wraps a DataLoader (dicts with input_ids/labels, or (x, y) tuples). Position = (step,
    micro_step) -> the n-th batch overall; the loader is re-iterated each epoch and, on resume,
    fast-forwarded. Reproducible when the loader's order is (shuffle=False or a seeded sampler)."""

    def __init__(self, loader: Iterable, grad_accum: int):
        self.loader, self.grad_accum = loader, grad_accum
        self.batches_per_epoch = len(loader)  # type: ignore[arg-type]
        self._iter, self._next_index = None, None

    def _as_dict(self, batch: Any) -> dict[str, torch.Tensor]:
        if isinstance(batch, dict):
            return batch
        x, y = batch
        return {"input_ids": x, "labels": y}

    def get(self, step: int, micro_step: int) -> dict[str, torch.Tensor]:
        index = step * self.grad_accum + micro_step
        epoch, within = divmod(index, self.batches_per_epoch)
        if self._iter is None or self._next_index != index or within == 0:
            # A sampler whose order depends on the epoch (DistributedSampler, lmforge's
            # EpochShuffleSampler) is told which one, so a resumed run replays that epoch's order.
            set_epoch = getattr(getattr(self.loader, "sampler", None), "set_epoch", None)
            if set_epoch is not None:
                set_epoch(epoch)
            self._iter = iter(self.loader)
            for _ in range(within):
                next(self._iter)
        self._next_index = index + 1
        return self._as_dict(next(self._iter))

    def epoch_of(self, step: int) -> int:
        return (step * self.grad_accum) // self.batches_per_epoch


def as_batches(data: Any, grad_accum: int) -> Batches | None:
    if data is None or isinstance(data, Batches):
        return data
    if hasattr(data, "get_batch"):
        return TokenFileBatches(data)
    return LoaderBatches(data, grad_accum)


def default_optimizer(
    model: nn.Module,
    name: str = "adamw",
    lr: float = 3e-4,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    muon_lr: float = 0.02,
    muon_momentum: float = 0.95,
    device: torch.device | None = None,
) -> list[torch.optim.Optimizer]:
    """AdamW with decay on matrices only (nanoGPT's grouping by rank), fused on CUDA; or Muon for
    the 2-D hidden weights plus AdamW for embeddings, head, norms and biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = device is not None and device.type == "cuda"
    if name == "muon":
        not_matrices = {  # tables, and canon layers' per-channel filters: 2-D but no matrices
            id(p)
            for n, p in model.named_parameters()
            if n.startswith(("wte.", "wpe.", "lm_head.")) or ".canon." in n
        }
        hidden = [p for p in params if p.dim() == 2 and id(p) not in not_matrices]
        rest = [p for p in params if p.dim() != 2 or id(p) in not_matrices]
        muon = torch.optim.Muon(
            hidden,
            lr=muon_lr,
            momentum=muon_momentum,
            weight_decay=0.0,
            adjust_lr_fn="match_rms_adamw",
        )
        muon.param_groups[0]["lr_scale"] = muon_lr / lr
        adamw = _adamw(rest, lr, weight_decay, betas, eps, fused)
        return [adamw, muon]
    return [_adamw(params, lr, weight_decay, betas, eps, fused)]


def _adamw(params, lr, weight_decay, betas, eps, fused) -> torch.optim.AdamW:
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)


class Trainer:
    """Train a model on batches; see SPEC §3 for the behaviour and `lmforge train` for the CLI.

    Python API (as the seed pipeline documents it)::

        trainer = Trainer(model, train_loader, val_loader, device="cpu",
                          gradient_accumulation_steps=2, checkpoint_dir="ckpt", log_interval=10)
        history = trainer.train(num_epochs=3, early_stopping_patience=2)
        trainer.validate()  # {"loss": ..., "perplexity": ...}
    """

    def __init__(
        self,
        model: nn.Module,
        train_data: Any = None,
        val_data: Any = None,
        optimizer: torch.optim.Optimizer | list[torch.optim.Optimizer] | None = None,
        criterion: Callable | None = None,
        device: str | Precision = "auto",
        gradient_accumulation_steps: int = 1,
        max_grad_norm: float = 1.0,
        checkpoint_dir: str | Path = "checkpoints",
        log_interval: int = 10,
        settings: TrainSettings | None = None,
        metrics: Any = None,
        state_extra: dict[str, Any] | None = None,
        sampler: Callable[[nn.Module, int], str] | None = None,
        dashboard: Any = None,
        log: Callable[[str], None] | None = None,
        compile_model: bool = False,
        train_model: nn.Module | None = None,
        dist: Dist | None = None,
        train_dataloader: Any = None,
        val_dataloader: Any = None,
    ):
        # The seed API's keyword names are aliases of train_data / val_data.
        if train_dataloader is not None:
            if train_data is not None:
                raise TypeError("give train_data or train_dataloader, not both")
            train_data = train_dataloader
        if train_data is None:
            raise TypeError("Trainer needs training data: train_data (or train_dataloader)")
        if val_dataloader is not None:
            if val_data is not None:
                raise TypeError("give val_data or val_dataloader, not both")
            val_data = val_dataloader
        self.precision = device if isinstance(device, Precision) else pick(device, "auto")
        if self.precision.device.type == "cuda":
            enable_tf32()
        self.device = self.precision.device
        self.settings = settings or TrainSettings(
            grad_accum=gradient_accumulation_steps,
            max_grad_norm=max_grad_norm,
            log_every=log_interval,
            warmup_steps=0,
            schedule="constant",
        )
        if optimizer is not None and settings is None:  # the user's optimizer keeps its lr
            first = optimizer[0] if isinstance(optimizer, list) else optimizer
            self.settings.lr = first.param_groups[0]["lr"]
        self.dist = dist or Dist()
        self.model = model.to(self.device)
        # What forward/backward run through: the model, or its DDP/FSDP wrapper, maybe compiled.
        self.train_model = train_model or self.model
        if compile_model:
            self.train_model = torch.compile(self.train_model)
        self.train_data = as_batches(train_data, self.settings.grad_accum)
        self.val_data = as_batches(val_data, 1)
        optimizers = optimizer or default_optimizer(
            self.model, lr=self.settings.lr, device=self.device
        )
        self.optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        for opt in self.optimizers:
            for group in opt.param_groups:
                group.setdefault("lr_scale", 1.0)
        self.criterion = criterion
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision.use_scaler)
        self.checkpoint_dir = Path(checkpoint_dir)
        self.metrics = metrics
        self.state_extra = state_extra or {}
        self.sampler = sampler
        self.dashboard = dashboard
        self.log = log or (metrics.log_line if metrics is not None else print)
        self.global_step = 0
        self.current_epoch = 0
        self.tokens_seen = 0
        self.best_val_loss = math.inf
        self.evals_without_improvement = 0
        self.history = History()
        self.elapsed = 0.0  # training wall time so far, warm-up passes excluded
        self._log_loss_sum, self._log_loss_count = 0.0, 0
        self.stop_reason = ""
        self.checkpoint_extra: dict[str, Any] = {}
        self._stop: GracefulStop | None = None
        self._last_save = time.monotonic()
        self.stop_agreed = self.time_save_agreed = False

    # ---------------------------------------------------------------- one step
    def _batch_to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        non_blocking = self.device.type == "cuda"
        return {
            k: v.to(self.device, non_blocking=non_blocking)
            for k, v in batch.items()
            if isinstance(v, torch.Tensor)
        }

    def _loss(self, batch: dict[str, torch.Tensor], reduction: str) -> torch.Tensor:
        ids, labels = batch["input_ids"], batch["labels"]
        with self.precision.autocast():
            if self.criterion is not None:  # the user's loss on full logits
                logits = self.train_model(ids)
                return self.criterion(
                    logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1)
                )
            return self.train_model(
                ids,
                labels,
                position_ids=batch.get("position_ids"),
                doc_ids=batch.get("doc_ids"),
                reduction=reduction,
            )

    def train_step(self) -> tuple[float, float]:
        """One optimizer step (grad_accum micro-batches). Returns (mean loss over all ranks,
        grad norm). Sets `stop_agreed` / `time_save_agreed`: the ranks agree on them in the same
        collective as the loss, so every rank stops and saves at the same step."""
        s, step = self.settings, self.global_step
        lr = self.lr_at(step)
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = lr * group["lr_scale"]
        batches = [self._batch_to_device(self.train_data.get(step, m)) for m in range(s.grad_accum)]
        by_tokens = s.loss_normalisation == "tokens"
        # Instruction tuning: normalise by the assistant tokens of ALL micro-batches, so a long
        # answer in one micro-batch weighs the same as if the batch had not been split.
        world = self.dist.world_size
        n_targets = 0
        if by_tokens:  # counted only when used: int() of a CUDA tensor waits for the GPU
            n_targets = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
            n_targets = int(self.dist.all_reduce_sum([n_targets], self.device)[0])
        total_loss = torch.zeros((), device=self.device)
        for m, batch in enumerate(batches):
            with no_grad_sync(self.train_model, self.dist, last_micro_step=m == len(batches) - 1):
                if by_tokens:  # x world: DDP averages gradients over ranks, undo it for sums
                    loss = self._loss(batch, "sum") * world / max(1, n_targets)
                else:
                    loss = self._loss(batch, "mean") / s.grad_accum
                self.scaler.scale(loss).backward()
            total_loss += loss.detach().float() / world
            self.tokens_seen += batch["input_ids"].numel() * world
        total_loss = total_loss.item()  # the step's one host-device sync for the loss
        stop = float(self._stop is not None and self._stop.requested is not None)
        by_time = self.settings.save_every_minutes and (
            time.monotonic() - self._last_save > 60 * self.settings.save_every_minutes
        )
        total_loss, stop, by_time = self.dist.all_reduce_sum(
            [total_loss, stop, float(bool(by_time))], self.device
        )
        self.stop_agreed, self.time_save_agreed = stop > 0, by_time > 0
        if not math.isfinite(total_loss):
            raise Diverged(
                f"loss became {total_loss} at step {step + 1}: stopping; the last good "
                f"checkpoint is kept in {self.checkpoint_dir} (lower optim.lr or check the data)"
            )
        for opt in self.optimizers:
            self.scaler.unscale_(opt)
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = s.max_grad_norm if s.max_grad_norm > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        for opt in self.optimizers:
            self.scaler.step(opt)
        self.scaler.update()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        self.global_step += 1
        return total_loss, grad_norm

    def lr_at(self, step: int) -> float:
        s = self.settings
        return lr_at(
            step,
            kind=s.schedule,
            lr=s.lr,
            min_lr=s.min_lr,
            warmup_steps=s.warmup_steps,
            max_steps=self._max_steps,
            decay_steps=s.decay_steps,
            wsd_decay_fraction=s.wsd_decay_fraction,
        )

    @property
    def _max_steps(self) -> int:
        s = self.settings
        by_epochs = 0
        if s.max_epochs and self.train_data is not None and self.train_data.batches_per_epoch:
            by_epochs = s.max_epochs * math.ceil(self.train_data.batches_per_epoch / s.grad_accum)
        if s.max_steps and by_epochs:
            return min(s.max_steps, by_epochs)
        return s.max_steps or by_epochs

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def validate(self, max_batches: int | None = None) -> dict[str, float]:
        """Mean loss over the fixed validation batches, and its perplexity."""
        if self.val_data is None:
            raise UserError("validate() needs validation data (val_data / val_dataloader)")
        n = max_batches or self.settings.eval_batches
        if self.val_data.batches_per_epoch:
            n = min(n, self.val_data.batches_per_epoch)
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        for i in range(n):
            batch = self._batch_to_device(self.val_data.get(i, 0))
            tokens = int((batch["labels"] != IGNORE_INDEX).sum())
            total += (
                self._loss(batch, "sum").item()
                if self.criterion is None
                else (self._loss(batch, "mean").item() * tokens)
            )
            count += tokens
        total, count = self.dist.all_reduce_sum([total, count], self.device)
        self.model.train(was_training)
        loss = total / max(1, count)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        model_state, optim_states = full_state(self.model, self.optimizers, self.dist)
        return {
            "model": model_state,
            "optimizers": optim_states,
            "scaler": self.scaler.state_dict(),
            "step": self.global_step,
            "epoch": self.current_epoch,
            "tokens_seen": self.tokens_seen,
            "best_val_loss": self.best_val_loss,
            "evals_without_improvement": self.evals_without_improvement,
            "elapsed": self.elapsed,
            "log_accumulator": [self._log_loss_sum, self._log_loss_count],
            "history": self.history.as_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "versions": {"lmforge": __version__, "torch": str(torch.__version__)},
            **self.state_extra,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.checkpoint_extra = {
            k: state[k] for k in ("config", "tokenizer", "data_meta") if k in state
        }
        if state.get("optimizers"):
            load_full_state(self.model, self.optimizers, state["model"], state["optimizers"])
        else:  # weights only (best.pt / final_model.pt)
            load_full_state(self.model, [], state["model"], [])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.global_step = state.get("step", 0)
        self.current_epoch = state.get("epoch", 0)
        self.tokens_seen = state.get("tokens_seen", 0)
        self.best_val_loss = state.get("best_val_loss", math.inf)
        self.evals_without_improvement = state.get("evals_without_improvement", 0)
        self.elapsed = state.get("elapsed", 0.0)
        self._log_loss_sum, self._log_loss_count = state.get("log_accumulator", [0.0, 0])
        if "history" in state:
            self.history = History(**state["history"])
        if "rng_cpu" in state:
            torch.set_rng_state(state["rng_cpu"])
        if state.get("rng_cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])

    def save_checkpoint(self, path: str | Path | None = None) -> Path:
        """Full training state, atomically, with a JSON record; keeps the newest `keep_last`."""
        path = Path(path) if path else self.checkpoint_dir / f"step_{self.global_step}.pt"
        state = self.state_dict()  # every rank: gathering FSDP shards is a collective
        if not self.dist.is_main:
            self.dist.barrier()
            return path
        ckpt.set_aside(path)  # never overwrite: a file already there (e.g. corrupt) is kept aside
        record = {
            "step": self.global_step,
            "epoch": self.current_epoch,
            "tokens_seen": self.tokens_seen,
            "best_val_loss": _finite(self.best_val_loss),
            "train_loss": self.history.train_loss[-1] if self.history.train_loss else None,
            "data_position": {"step": self.global_step, "micro_step": 0},
        }
        try:
            ckpt.save_checkpoint(path, state, record)
            if ckpt.STEP_FILE.match(path.name) and path.parent == self.checkpoint_dir:
                ckpt.prune(self.checkpoint_dir, self.settings.keep_last)
        finally:
            self.dist.barrier()
        return path

    def save_weights(self, path: Path, extra: dict[str, Any] | None = None) -> Path:
        """Weights and identity only (best.pt, final_model.pt): what generate/sft/export need."""
        model_state, _ = full_state(self.model, [], self.dist)
        if not self.dist.is_main:
            return path
        state = {
            "model": model_state,
            "step": self.global_step,
            "tokens_seen": self.tokens_seen,
            **self.state_extra,
            **(extra or {}),
        }
        record = {"step": self.global_step, "tokens_seen": self.tokens_seen, **(extra or {})}
        return ckpt.save_checkpoint(path, state, record)

    def load_checkpoint(self, path: str | Path) -> None:
        self.load_state_dict(ckpt.load_checkpoint(path, map_location=self.device))

    def resume(self, spec: str = "auto") -> Path | None:
        """auto: newest valid checkpoint in checkpoint_dir (corrupt ones reported); none; a path."""
        if spec == "none":
            return None
        if spec == "auto":
            found = ckpt.newest_valid(
                self.checkpoint_dir, report=self.log, map_location=self.device
            )
            if found is None:
                return None
            path, state = found
            self.load_state_dict(state)
            return path
        self.load_checkpoint(spec)
        return Path(spec)

    def save_history(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.history.as_dict(), indent=1) + "\n", encoding="utf-8")

    # ---------------------------------------------------------------- the loop
    def warm_up(self) -> None:
        """A few untimed forward/backward passes (compilation, allocator, kernel autotune), so the
        first logged step times are honest. Gradients are discarded; no state changes."""
        if not self.settings.warmup_passes or self.global_step > 0:
            return
        rng = torch.get_rng_state()
        batch = self._batch_to_device(self.train_data.get(0, 0))
        for _ in range(self.settings.warmup_passes):
            self.scaler.scale(self._loss(batch, "mean")).backward()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        torch.set_rng_state(rng)
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def train(
        self,
        num_epochs: int | None = None,
        max_steps: int | None = None,
        save_every: int | None = None,
        early_stopping_patience: int | None = None,
        resume: str | None = None,
    ) -> dict[str, list]:
        """Run until max_steps / num_epochs / early stopping / a signal. Returns the history.

        With a DataLoader and `num_epochs`, `save_every` counts epochs (as the seed API does);
        otherwise steps. Checkpoints go to checkpoint_dir.
        """
        s = self.settings
        if num_epochs is not None:
            s.max_epochs, s.max_steps = num_epochs, max_steps or 0
        elif max_steps is not None:
            s.max_steps = max_steps
        if early_stopping_patience is not None:
            s.patience = early_stopping_patience
        if save_every is not None:
            per_epoch = math.ceil((self.train_data.batches_per_epoch or 1) / s.grad_accum)
            s.save_every = save_every * per_epoch if num_epochs is not None else save_every
        if resume:
            self.resume(resume)
        if s.patience and self.val_data is None:
            raise UserError("early stopping needs validation data")
        if (
            self.val_data is not None
            and not s.eval_every
            and (s.patience or num_epochs is not None)
        ):
            # Validate after every epoch (the seed API's behaviour, and what patience counts).
            s.eval_every = max(
                1, math.ceil((self.train_data.batches_per_epoch or 1) / s.grad_accum)
            )
        total = self._max_steps
        self.model.train()
        self.warm_up()
        bar = _progress(total, self.global_step) if s.progress else None
        interval_start, interval_steps = time.perf_counter(), 0
        with GracefulStop() as stop:
            self._stop, self._last_save = stop, time.monotonic()
            while self.global_step < total:
                t0 = time.perf_counter()
                loss, grad_norm = self.train_step()
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                self.elapsed += time.perf_counter() - t0
                interval_steps += 1
                self._log_loss_sum += loss
                self._log_loss_count += 1
                self.current_epoch = self.train_data.epoch_of(self.global_step)
                step = self.global_step
                row = None
                if step % s.log_every == 0 or step == total:
                    ms = 1000 * (time.perf_counter() - interval_start) / interval_steps
                    row = self._log_row(step, grad_norm, ms)
                    interval_start, interval_steps = time.perf_counter(), 0
                at_eval = step == total or (s.eval_every and step % s.eval_every == 0)
                if self.val_data is not None and at_eval:
                    row = self._evaluate(step, row)
                if row is not None and self.metrics is not None:
                    self.metrics.write(row)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                # FSDP gathers weights in forward: every rank must take part in sampling.
                sampling_rank = self.dist.is_main or self.dist.strategy == "fsdp"
                if self.sampler and s.sample_every and step % s.sample_every == 0 and sampling_rank:
                    self.sampler(self.model, step)
                if self.dashboard is not None:
                    self.dashboard.maybe_refresh(step)
                due = s.save_every and step % s.save_every == 0
                if due or self.time_save_agreed or self.stop_agreed:
                    path = self.save_checkpoint()
                    self._last_save = time.monotonic()
                    if self.stop_agreed:
                        signal_name = stop.requested or "a stop request on another rank"
                        self.stop_reason = f"{signal_name}: checkpoint saved to {path}"
                        break
                if self.stop_reason:
                    break
        if bar is not None:
            bar.close()
        if not self.stop_reason:
            self.stop_reason = "finished"
        return self.history.as_dict()

    def _log_row(self, step: int, grad_norm: float, ms_per_step: float) -> dict[str, Any]:
        s = self.settings
        loss = self._log_loss_sum / max(1, self._log_loss_count)
        self._log_loss_sum, self._log_loss_count = 0.0, 0
        lr = self.lr_at(step - 1)
        tokens_per_step = self.tokens_seen / max(1, step)
        tokens_per_s = tokens_per_step * 1000 / ms_per_step if ms_per_step > 0 else 0.0
        mfu = None
        if s.flops_per_token and (s.peak_flops or self.device.type == "cuda"):
            from lmforge.monitor.metrics import mfu as compute_mfu

            name = torch.cuda.get_device_name() if self.device.type == "cuda" else self.device.type
            mfu = compute_mfu(
                s.flops_per_token, tokens_per_s, name, self.precision.dtype, s.peak_flops
            )
        memory_mb = _memory_mb(self.device)
        self.history.step.append(step)
        self.history.train_loss.append(loss)
        self.history.lr.append(lr)
        self.history.grad_norm.append(grad_norm)
        eta = (self._max_steps - step) * ms_per_step / 1000
        mfu_text = f" | mfu {100 * mfu:.1f}%" if mfu is not None else ""
        self.log(
            f"step {step:>6}/{self._max_steps} | loss {loss:.4f} | lr {lr:.2e} | "
            f"grad {grad_norm:.3f} | {ms_per_step:.1f} ms/step | {tokens_per_s:,.0f} tok/s"
            f"{mfu_text} | mem {memory_mb:,.0f} MB | tokens {self.tokens_seen:,} | "
            f"eta {_duration(eta)}"
        )
        return {
            "step": step,
            "tokens_seen": self.tokens_seen,
            "elapsed_s": round(self.elapsed, 3),
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "ms_per_step": ms_per_step,
            "tokens_per_s": tokens_per_s,
            "mfu": mfu,
            "memory_mb": memory_mb,
        }

    def _evaluate(self, step: int, row: dict[str, Any] | None) -> dict[str, Any]:
        s = self.settings
        result = self.validate()
        loss = result["loss"]
        self.history.val_step.append(step)
        self.history.val_loss.append(loss)
        self.history.val_perplexity.append(result["perplexity"])
        improved = loss < self.best_val_loss - s.min_delta
        line = f"eval step {step} | val loss {loss:.4f} | ppl {result['perplexity']:.3f}"
        if s.entropy_floor is not None:
            line += f" | floor {s.entropy_floor:.4f} (+{loss - s.entropy_floor:.4f} nats above)"
            if loss < s.entropy_floor:
                line += (
                    "\n!!! validation loss is BELOW the entropy floor: this is a bug "
                    "(a leak between train and val, a mask or a loss error) !!!"
                )
        if loss < self.best_val_loss:
            self.best_val_loss = loss
            line += " | new best"
            self.save_weights(self.checkpoint_dir / "best.pt", {"val_loss": loss})
        self.evals_without_improvement = 0 if improved else self.evals_without_improvement + 1
        self.log(line)
        if s.patience and self.evals_without_improvement >= s.patience:
            self.stop_reason = (
                f"early stopping: no val-loss improvement above {s.min_delta} for "
                f"{s.patience} evaluations (best {self.best_val_loss:.4f})"
            )
            self.log(self.stop_reason)
        row = row or {
            "step": step,
            "tokens_seen": self.tokens_seen,
            "elapsed_s": round(self.elapsed, 3),
        }
        row.update(val_loss=loss, val_ppl=result["perplexity"])
        return row


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    if device.type == "mps":
        return torch.mps.current_allocated_memory() / 2**20
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss_kb / (2**20 if sys.platform == "darwin" else 2**10)


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _progress(total: int, start: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, leave=False)
