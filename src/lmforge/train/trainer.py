"""The training loop: one Trainer for phase 1 (token files) and phase 2 (instruction batches).

Everything the loop needs to continue after a crash is in the checkpoint: model, optimizer(s),
gradient scaler, step, tokens seen, best validation loss, early-stopping count, the running log
average, the RNG state and how far each log file had got. Batches are a pure function of (seed,
step, micro-step, rank), so the resumed run reads exactly what the uninterrupted one would have
read, and its log files continue from the checkpoint's byte offsets: nothing is repeated or torn.

One step is `train_step` (forward/backward over the micro-batches, clip, optimizer step) and then
`_after_step` (log row, eval, samples, dashboard). On SIGTERM the checkpoint is written between the
two, so a scheduler's grace period is spent on the save; the checkpoint says its step's after-work
is pending, and a resumed run does that work first, as the uninterrupted run would have.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge import __version__
from lmforge.chat_format import IGNORE_INDEX
from lmforge.config import Config, LogConfig, OptimConfig, ScheduleConfig, TrainConfig
from lmforge.device import Precision, enable_tf32, pick
from lmforge.distributed import Dist, full_state, load_full_state, no_grad_sync
from lmforge.errors import UserError
from lmforge.model import Transformer
from lmforge.monitor.metrics import MetricsRow, mfu
from lmforge.train import checkpoint as ckpt
from lmforge.train.optim import build_optimizer
from lmforge.train.schedule import lr_at, wsd_decay_start
from lmforge.train.signals import GracefulStop


class Diverged(UserError):
    """The loss became NaN or infinite, or the gradients did, step after step."""


_T, _S, _L = TrainConfig, ScheduleConfig, LogConfig


@dataclass
class TrainSettings:
    """What the loop does and when. `from_config` is the one place a run's config becomes these;
    the defaults are the config's. The Python API (`Trainer(model, loader, ...)` without settings)
    starts from `for_api()`: constant lr, no warmup, no periodic saves/evals/samples."""

    max_steps: int = _T.max_steps
    max_epochs: int = _T.max_epochs
    grad_accum: int = _T.grad_accum
    max_grad_norm: float = _T.max_grad_norm
    max_skipped_steps: int = _T.max_skipped_steps
    lr: float = OptimConfig.lr
    min_lr: float = OptimConfig.min_lr
    schedule: str = _S.kind
    warmup_steps: int = _S.warmup_steps
    decay_steps: int = _S.decay_steps
    wsd_decay_fraction: float = _S.wsd_decay_fraction
    log_every: int = _L.log_every
    eval_every: int = _T.eval_every
    eval_batches: int = _T.eval_batches
    save_every: int = _T.save_every
    save_every_minutes: float = _T.save_every_minutes
    keep_last: int = _T.keep_last
    sample_every: int = _T.sample_every
    patience: int = _T.patience
    min_delta: float = _T.min_delta
    warmup_passes: int = _T.warmup_passes
    seed: int = _T.seed
    loss_normalisation: str = "mean"  # "tokens": sum over micro-batches / target tokens (SFT)
    entropy_floor: float | None = None
    chars_per_token: float | None = None  # to say the distance to the floor per character too
    flops_per_token: int = 0
    peak_flops: float | None = None
    progress: bool = False

    @classmethod
    def from_config(cls, cfg: Config, **phase: Any) -> TrainSettings:
        """The settings of a run; `phase` holds what the phase decides (SFT: its own patience,
        min_delta and max_epochs, loss normalised by tokens; the floor of the data)."""
        t, o, sch, log = cfg.train, cfg.optim, cfg.schedule, cfg.log
        values = {
            **{f.name: getattr(t, f.name) for f in fields(cls) if hasattr(t, f.name)},
            "lr": o.lr,
            "min_lr": o.min_lr,
            "schedule": sch.kind,
            "warmup_steps": sch.warmup_steps,
            "decay_steps": sch.decay_steps,
            "wsd_decay_fraction": sch.wsd_decay_fraction,
            "log_every": log.log_every,
            "peak_flops": log.peak_tflops * 1e12 or None,
            "progress": sys.stderr.isatty() if log.progress == "auto" else log.progress == "true",
        }
        return cls(**{**values, **phase})

    @classmethod
    def for_api(cls, **values: Any) -> TrainSettings:
        """The Python API's defaults: constant lr, no warmup, no periodic saves/evals/samples
        (`train()` sets them per epoch), validation over the whole val loader (eval_batches 0)."""
        quiet = dict(schedule="constant", warmup_steps=0, eval_every=0, save_every=0,
                     save_every_minutes=0.0, sample_every=0, warmup_passes=0,
                     eval_batches=0)  # fmt: skip
        return cls(**{**quiet, **values})


@dataclass
class EpochRow:
    """One finished epoch of the Python API's history: the mean training loss of its steps, the
    learning rate of its last step and the validation after it (None without val data)."""

    epoch: int
    step: int
    train_loss: float
    lr: float
    val_loss: float | None = None
    val_perplexity: float | None = None


class History(Mapping):
    """A run's history, read as a dict of lists: `history["train_loss"]`, `history.val_loss`.

    It holds the logged rows (`MetricsRow`s, as the CSV has them: `rows`, `steps()`) and, for the
    Python API, one `EpochRow` per finished epoch (`epochs`, `per_epoch()`). Which of the two the
    dict view shows is `by_epoch`: per epoch for a Trainer of the Python API (what the seed
    document's `history["train_loss"]` / `history["val_loss"]` loop pairs, one value per epoch),
    per logged step for the CLI's (what `training_metrics.csv` holds).
    """

    KEYS = ("step", "train_loss", "lr", "grad_norm", "val_step", "val_loss", "val_perplexity")
    EPOCH_KEYS = ("epoch", "step", "train_loss", "lr", "val_loss", "val_perplexity")

    def __init__(
        self,
        rows: list[MetricsRow] | None = None,
        epochs: list[EpochRow] | None = None,
        by_epoch: bool = False,
    ) -> None:
        self.rows: list[MetricsRow] = list(rows or [])
        self.epochs: list[EpochRow] = list(epochs or [])
        self.by_epoch = by_epoch

    def add(self, row: MetricsRow) -> None:
        self.rows.append(row)

    def as_dict(self) -> dict[str, list]:
        """The columns as lists (a plain dict: what `train()` returns and `save_history` writes)."""
        return self.per_epoch() if self.by_epoch else self.steps()

    def per_epoch(self) -> dict[str, list]:
        """One value per finished epoch; the val columns only for epochs that had validation."""
        val = [e for e in self.epochs if e.val_loss is not None]
        return {
            "epoch": [e.epoch for e in self.epochs],
            "step": [e.step for e in self.epochs],
            "train_loss": [e.train_loss for e in self.epochs],
            "lr": [e.lr for e in self.epochs],
            "val_loss": [e.val_loss for e in val],
            "val_perplexity": [e.val_perplexity for e in val],
        }

    def steps(self) -> dict[str, list]:
        """One value per logged step (train columns) and per evaluation (val columns)."""
        train = [r for r in self.rows if r.loss is not None]
        val = [r for r in self.rows if r.val_loss is not None]
        return {
            "step": [r.step for r in train],
            "train_loss": [r.loss for r in train],
            "lr": [r.lr for r in train],
            "grad_norm": [r.grad_norm for r in train],
            "val_step": [r.step for r in val],
            "val_loss": [r.val_loss for r in val],
            "val_perplexity": [r.val_ppl for r in val],
        }

    def _keys(self) -> tuple[str, ...]:
        return self.EPOCH_KEYS if self.by_epoch else self.KEYS

    def __getitem__(self, key: str) -> list:
        if key not in self._keys():
            raise KeyError(f"{key!r}: history has {', '.join(self._keys())}")
        return self.as_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())

    def __getattr__(self, key: str) -> list:
        if key in History.KEYS or key in History.EPOCH_KEYS:
            try:
                return self[key]
            except KeyError as e:
                raise AttributeError(*e.args) from None
        raise AttributeError(key)

    def __repr__(self) -> str:
        return f"History({self.as_dict()!r})"

    def state_dict(self) -> list[dict[str, Any]]:
        return [r.as_dict() for r in self.rows]

    def epochs_state(self) -> list[dict[str, Any]]:
        return [asdict(e) for e in self.epochs]

    @classmethod
    def from_state(cls, state: Any, epochs: Any = None, by_epoch: bool = False) -> History:
        rows = [MetricsRow(**row) for row in state] if isinstance(state, list) else []
        finished = [EpochRow(**e) for e in epochs] if isinstance(epochs, list) else []
        return cls(rows, finished, by_epoch)


class Batches(ABC):
    """What the loop reads: `get(step, micro_step) -> dict` with `input_ids` and `labels` (B, T),
    optionally `position_ids`/`doc_ids`; `epoch_of(step)`. Adapters below wrap token files and
    DataLoaders.

    `rank_aware` batches give each process its own share already (token windows split by rank);
    for the others, validation spreads whole batches over the ranks (batch i on rank i % world).
    """

    rank_aware: bool = False

    @abstractmethod
    def get(self, step: int, micro_step: int) -> dict[str, torch.Tensor]:
        """The micro-batch at this position: a pure function of (step, micro_step)."""

    def epoch_of(self, step: int) -> int:
        return 0

    def micro_steps(self, step: int, grad_accum: int) -> int:
        """Micro-batches of this step: grad_accum, except where an epoch ends early."""
        return grad_accum

    batches_per_epoch: int | None = None


class TokenFileBatches(Batches):
    """Wraps `lmforge.data.memmap.TokenBatches` (x, y) windows."""

    rank_aware = True

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
    """Wraps a DataLoader (dicts with input_ids/labels, or (x, y) tuples). An epoch is one pass
    over the loader: ceil(len / grad_accum) steps, the last one with the batches that are left
    (so every batch is read once per epoch, and epochs start on a step). Position = (step,
    micro_step) -> (epoch, batch within it); the loader is re-iterated each epoch and, on resume,
    fast-forwarded. Reproducible when the loader's order is (shuffle=False or a seeded sampler)."""

    def __init__(self, loader: Iterable, grad_accum: int):
        self.loader, self.grad_accum = loader, grad_accum
        self.batches_per_epoch = len(loader)  # type: ignore[arg-type]
        if not self.batches_per_epoch:
            raise UserError("a DataLoader given to the Trainer is empty: it yields no batches")
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / grad_accum)
        self._iter, self._next = None, None

    def _as_dict(self, batch: Any) -> dict[str, torch.Tensor]:
        if isinstance(batch, dict):
            return batch
        x, y = batch
        return {"input_ids": x, "labels": y}

    def micro_steps(self, step: int, grad_accum: int) -> int:
        first = (step % self.steps_per_epoch) * self.grad_accum
        return min(self.grad_accum, self.batches_per_epoch - first)

    def get(self, step: int, micro_step: int) -> dict[str, torch.Tensor]:
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        within = step_in_epoch * self.grad_accum + micro_step
        if self._iter is None or self._next != (epoch, within) or within == 0:
            # A sampler whose order depends on the epoch (DistributedSampler, lmforge's
            # EpochShuffleSampler) is told which one, so a resumed run replays that epoch's order.
            set_epoch = getattr(getattr(self.loader, "sampler", None), "set_epoch", None)
            if set_epoch is not None:
                set_epoch(epoch)
            self._iter = iter(self.loader)
            for _ in range(within):
                next(self._iter)
        self._next = (epoch, within + 1)
        return self._as_dict(next(self._iter))

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch


def as_batches(data: Any, grad_accum: int) -> Batches | None:
    if data is None or isinstance(data, Batches):
        return data
    if hasattr(data, "get_batch"):
        return TokenFileBatches(data)
    return LoaderBatches(data, grad_accum)


class Trainer:
    """Train a model on batches; see SPEC §3 for the behaviour and `lmforge train` for the CLI.

    Python API, as the seed pipeline's document (seeds/004) writes it::

        trainer = Trainer(model, train_loader, val_loader, device="cpu",
                          gradient_accumulation_steps=2, checkpoint_dir="ckpt", log_interval=10)
        history = trainer.train(num_epochs=3, early_stopping_patience=2)
        history["train_loss"], history["val_loss"]  # one value per epoch
        trainer.validate()  # {"loss": ..., "perplexity": ...} over the whole val loader
        trainer.save_checkpoint(path, is_best=True)  # and checkpoint_dir/best.pt

    `model` is any `nn.Module` whose `forward(input_ids)` returns logits (B, T, V) (or an object
    with `.logits`, or a tuple whose first item they are); the default loss is cross-entropy
    over them, -100 ignored, as the document's `nn.CrossEntropyLoss`. An lmforge `Transformer`
    gets the same loss computed chunked (`model(ids, labels)`), without the full logits.
    `criterion(logits (N, V), labels (N,))` replaces it.

    A Trainer made without `settings` is the Python API and follows the document where it and
    the CLI differ (a Trainer made with `settings`, as `lmforge train` makes it, keeps the CLI's):
    * `train(num_epochs=N)` trains N more epochs from where the trainer is (after
      `load_checkpoint` of an epoch-10 checkpoint, epochs 11..10+N; a partly done epoch counts
      as one); `train(max_steps=M)` M more steps. The CLI's `train.max_steps` /
      `train.max_epochs` are totals of the run.
    * an epoch is one pass over the train loader; with gradient accumulation its last step
      takes the batches that are left;
    * `history` (and what `train` returns) holds one value per epoch (`train_loss`: the mean
      of the epoch's steps; `val_loss`/`val_perplexity` after each epoch); the CLI's is one row
      per logged step, as `training_metrics.csv` (both are in `history.rows` / `epochs`);
    * validation runs after every epoch, over the whole val loader; the CLI's every
      `train.eval_every` steps over `train.eval_batches` batches;
    * `save_every` counts epochs (default 1: `checkpoint_dir/step_N.pt` after each epoch, the
      newest 5 kept); `early_stopping_patience` counts epochs without a val-loss drop of at
      least `min_delta` (TrainSettings, 0.001);
    * the learning rate is constant (the optimizer's own, or 3e-4 for the default AdamW).
    `device` defaults to "auto" (SPEC §3: cuda, then mps, then cpu), where the document has
    "cpu"; pass `device="cpu"` for the document's behaviour on a machine with a GPU.
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
        self.api = settings is None  # the Python API: the document's semantics (class doc)
        self.settings = settings or TrainSettings.for_api(
            grad_accum=gradient_accumulation_steps,
            max_grad_norm=max_grad_norm,
            log_every=log_interval,
        )
        if optimizer is not None and settings is None:  # the user's optimizer keeps its lr
            first = optimizer[0] if isinstance(optimizer, list) else optimizer
            self.settings.lr = first.param_groups[0]["lr"]
        self.dist = dist or Dist()
        self.model = model.to(self.device)
        # What forward/backward run through: the model, or its DDP/FSDP wrapper, maybe compiled.
        self.train_model = train_model or self.model
        self.compiled = compile_model
        if compile_model:
            self.train_model = torch.compile(self.train_model)
        self.train_data = as_batches(train_data, self.settings.grad_accum)
        self.val_data = as_batches(val_data, 1)
        optimizers = optimizer or build_optimizer(
            self.model, OptimConfig(lr=self.settings.lr), self.device
        )
        self.optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        for opt in self.optimizers:
            for group in opt.param_groups:
                group.setdefault("lr_scale", 1.0)
        self.criterion = criterion
        # lmforge's Transformer computes its loss chunked; any other model returns logits.
        self.fused_loss = isinstance(model, Transformer)
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
        self.skipped_in_a_row = 0  # steps whose gradient norm was not finite, consecutively
        self.skipped_steps = 0
        self.history = History(by_epoch=self.api)
        self._epoch_loss_sum, self._epoch_loss_count = 0.0, 0  # the epoch so far (API history)
        self.elapsed = 0.0  # training wall time so far, warm-up passes excluded
        self._log_loss_sum, self._log_loss_count = 0.0, 0
        self._last_grad_norm = 0.0
        # The log interval: its steps' own time (ms/step, tokens/s, MFU: evaluations, samples and
        # saves between steps excluded) and the wall time since fit() began (the ETA).
        self._interval_steps, self._interval_train_s = 0, 0.0
        self._fit_start, self._fit_start_step = time.perf_counter(), 0
        self.after_work_pending = False  # set by a checkpoint saved on SIGTERM
        self._bar: Any = None
        self.last_saved_step = -1
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
            if self.criterion is not None or not self.fused_loss:  # a loss on the full logits
                logits = _logits(self.train_model(ids))
                logits, labels = logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1)
                if self.criterion is not None:
                    return self.criterion(logits, labels)
                return F.cross_entropy(
                    logits, labels, ignore_index=IGNORE_INDEX, reduction=reduction
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
        micro_steps = self.train_data.micro_steps(step, s.grad_accum)
        batches = [self._batch_to_device(self.train_data.get(step, m)) for m in range(micro_steps)]
        by_tokens = s.loss_normalisation == "tokens"
        # Instruction tuning: normalise by the target tokens of ALL micro-batches (of all ranks),
        # so a long answer in one micro-batch weighs the same as if the batch had not been split.
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
                    loss = self._loss(batch, "mean") / micro_steps
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
        if math.isfinite(grad_norm) or self.precision.use_scaler:
            # (fp16: the scaler skips steps with inf gradients itself and lowers its scale)
            for opt in self.optimizers:
                self.scaler.step(opt)
            self.scaler.update()
            self.skipped_in_a_row = 0
        else:
            self._skip_step(step + 1, grad_norm)
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        self.global_step += 1
        return total_loss, grad_norm

    def _skip_step(self, step: int, grad_norm: float) -> None:
        """A finite loss with a non-finite gradient: the update is never applied (nor saved)."""
        self.skipped_in_a_row += 1
        self.skipped_steps += 1
        limit = self.settings.max_skipped_steps
        self.log(
            f"step {step}: gradient norm is {grad_norm}: update skipped "
            f"({self.skipped_in_a_row} in a row; the run stops after {limit})"
        )
        if self.skipped_in_a_row >= limit:
            raise Diverged(
                f"the gradient norm was not finite for {limit} steps in a row (last at step "
                f"{step}): stopping; the last good checkpoint is kept in {self.checkpoint_dir} "
                "(lower optim.lr, or check the data)"
            )

    def lr_at(self, step: int) -> float:
        s = self.settings
        return lr_at(
            step,
            kind=s.schedule,
            lr=s.lr,
            min_lr=s.min_lr,
            warmup_steps=s.warmup_steps,
            max_steps=self.max_steps,
            decay_steps=s.decay_steps,
            wsd_decay_fraction=s.wsd_decay_fraction,
        )

    @property
    def max_steps(self) -> int:
        """The run's last step: train.max_steps, or max_epochs worth of steps, the smaller."""
        s = self.settings
        by_epochs = 0
        if s.max_epochs and self.train_data is not None and self.train_data.batches_per_epoch:
            by_epochs = s.max_epochs * self.steps_per_epoch
        if s.max_steps and by_epochs:
            return min(s.max_steps, by_epochs)
        return s.max_steps or by_epochs

    @property
    def steps_per_epoch(self) -> int:
        per_epoch = self.train_data.batches_per_epoch or 1
        return max(1, math.ceil(per_epoch / self.settings.grad_accum))

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def validate(self, max_batches: int | None = None) -> dict[str, float]:
        """Mean loss per target token over the fixed validation batches, and its perplexity.

        The Python API averages the whole val loader (as the document's validate does); the
        CLI the first `train.eval_batches`; `max_batches` caps either."""
        if self.val_data is None:
            raise UserError("validate() needs validation data (val_data / val_dataloader)")
        everything = self.val_data.batches_per_epoch or TrainConfig.eval_batches
        n = max_batches or self.settings.eval_batches or everything
        if self.val_data.batches_per_epoch:
            n = min(n, self.val_data.batches_per_epoch)
        d = self.dist
        indices = range(n) if self.val_data.rank_aware else range(d.rank, n, d.world_size)
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        for i in indices:
            batch = self._batch_to_device(self.val_data.get(i, 0))
            tokens = int((batch["labels"] != IGNORE_INDEX).sum())
            total += (
                self._loss(batch, "sum").item()
                if self.criterion is None
                else (self._loss(batch, "mean").item() * tokens)
            )
            count += tokens
        total, count = d.all_reduce_sum([total, count], self.device)
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
            "skipped_steps": [self.skipped_steps, self.skipped_in_a_row],
            "elapsed": self.elapsed,
            "log_accumulator": [self._log_loss_sum, self._log_loss_count],
            "last_grad_norm": self._last_grad_norm,
            "after_work_pending": self.after_work_pending,
            "log_offsets": self.metrics.sync() if self.metrics is not None else {},
            "history": self.history.state_dict(),
            "epoch_history": self.history.epochs_state(),
            "epoch_accumulator": [self._epoch_loss_sum, self._epoch_loss_count],
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "versions": {"lmforge": __version__, "torch": str(torch.__version__)},
            **self.state_extra,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.checkpoint_extra = {
            k: state[k] for k in ("config", "tokenizer", "data_meta", "phase") if k in state
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
        self.skipped_steps, self.skipped_in_a_row = state.get("skipped_steps", [0, 0])
        self.elapsed = state.get("elapsed", 0.0)
        self._log_loss_sum, self._log_loss_count = state.get("log_accumulator", [0.0, 0])
        self._last_grad_norm = state.get("last_grad_norm", 0.0)
        self.after_work_pending = bool(state.get("after_work_pending", False))
        self.history = History.from_state(
            state.get("history"), state.get("epoch_history"), self.history.by_epoch
        )
        self._epoch_loss_sum, self._epoch_loss_count = state.get("epoch_accumulator", [0.0, 0])
        self.last_saved_step = self.global_step
        if "rng_cpu" in state:
            torch.set_rng_state(state["rng_cpu"])
        if state.get("rng_cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])

    def save_checkpoint(self, path: str | Path | None = None, is_best: bool = False) -> Path:
        """Full training state, atomically, with a JSON record; keeps the newest `keep_last`
        step files. Default path: checkpoint_dir/step_N.pt. `is_best` (the document's flag) also
        writes the same state to checkpoint_dir/best.pt, where the best model is kept."""
        path = Path(path) if path else self.checkpoint_dir / f"step_{self.global_step}.pt"
        if is_best:
            best = self.checkpoint_dir / "best.pt"
            if path.resolve() != best.resolve():
                self.save_checkpoint(best)
        state = self.state_dict()  # every rank: gathering FSDP shards is a collective
        self.last_saved_step, self._last_save = self.global_step, time.monotonic()
        if not self.dist.is_main:
            self.dist.barrier()
            return path
        if ckpt.STEP_FILE.match(path.name):
            ckpt.set_aside(path)  # a file there is from a timeline we did not resume: kept aside
        record = {
            "step": self.global_step,
            "epoch": self.current_epoch,
            "tokens_seen": self.tokens_seen,
            "best_val_loss": _finite(self.best_val_loss),
            "train_loss": _finite(self._log_loss_sum / self._log_loss_count)
            if self._log_loss_count
            else (self.history.rows[-1].loss if self.history.rows else None),
            "data_position": {"step": self.global_step, "micro_step": 0},
            "after_work_pending": self.after_work_pending,
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
        self.load_state_dict(ckpt.load_checkpoint(path))

    def resume(self, spec: str = "auto") -> Path | None:
        """auto: newest valid checkpoint in checkpoint_dir (corrupt ones reported); none; a path."""
        if spec == "none":
            return None
        if spec == "auto":
            found = ckpt.newest_valid(self.checkpoint_dir, report=self.log)
            if found is None:
                return None
            path, state = found
            self.load_state_dict(state)
            return path
        self.load_checkpoint(spec)
        return Path(spec)

    def save_history(self, path: str | Path) -> None:
        from lmforge.files import write_json

        write_json(path, self.history.as_dict())

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
        save_every: int | None = None,
        early_stopping_patience: int | None = None,
        *,
        max_steps: int | None = None,
        resume: str | None = None,
    ) -> dict[str, list]:
        """Train; returns the history as a dict of lists (per epoch in the Python API).

        The document's `train(num_epochs, save_every=1, early_stopping_patience=None)`:
        `num_epochs` more epochs from where the trainer is (a partly done one counts as one),
        a checkpoint `checkpoint_dir/step_N.pt` every `save_every` epochs (0: none), early
        stopping after `early_stopping_patience` epochs whose val loss did not drop by
        `min_delta`. `max_steps`: at most that many more steps. With none of them (the CLI), the
        settings' totals. It stops early on a signal (SIGINT/SIGTERM: a checkpoint is saved).
        `resume`: "auto" (the newest valid checkpoint in checkpoint_dir), or a path, first.
        """
        s = self.settings
        if resume:
            self.resume(resume)
        for name, value in (("num_epochs", num_epochs), ("max_steps", max_steps)):
            if value is not None and (isinstance(value, bool) or value < 1):
                raise UserError(f"train({name}={value!r}): give a whole number of at least 1")
        if num_epochs is not None or max_steps is not None:  # counted from here (class doc)
            done_epochs = self.train_data.epoch_of(self.global_step)
            s.max_epochs = done_epochs + num_epochs if num_epochs is not None else 0
            s.max_steps = self.global_step + max_steps if max_steps is not None else 0
        if early_stopping_patience is not None:
            s.patience = early_stopping_patience
        if self.api:
            s.save_every = self.steps_per_epoch * (1 if save_every is None else save_every)
        elif save_every is not None:
            s.save_every = save_every
        if s.patience and self.val_data is None:
            raise UserError("early stopping needs validation data (val_dataloader)")
        if self.val_data is not None and not s.eval_every and (s.patience or self.api):
            s.eval_every = self.steps_per_epoch  # after every epoch: what patience counts
        self.stop_reason = ""
        self.model.train()
        self.warm_up()
        self._bar = _progress(self.max_steps, self.global_step) if s.progress else None
        self._interval_steps, self._interval_train_s = 0, 0.0
        self._fit_start, self._fit_start_step = time.perf_counter(), self.global_step
        with GracefulStop() as stop:
            self._stop, self._last_save = stop, time.monotonic()
            if self.after_work_pending:  # resumed from a SIGTERM save: its step's work is due
                self.after_work_pending = False
                self._after_step(self.global_step)
            while self.global_step < self.max_steps and not self.stop_reason:
                self._one_step(stop)
        if self._bar is not None:
            self._bar.close()
        if not self.stop_reason:
            self.stop_reason = "finished"
        return self.history.as_dict()

    def _one_step(self, stop: GracefulStop) -> None:
        t0 = time.perf_counter()
        # No torch.cuda.synchronize() here: the GPU runs this step's optimizer kernels while the
        # host reads the next batch. The next step's loss read waits for them, so they count
        # there; the times drift by at most one optimizer step.
        loss, self._last_grad_norm = self.train_step()
        took = time.perf_counter() - t0
        self.elapsed += took
        self._interval_train_s += took
        self._interval_steps += 1
        self._log_loss_sum += loss
        self._log_loss_count += 1
        self._epoch_loss_sum += loss
        self._epoch_loss_count += 1
        self.current_epoch = self.train_data.epoch_of(self.global_step)
        step = self.global_step
        if self.stop_agreed:  # the save first: a scheduler's grace period is short
            self.after_work_pending = True
            path = self.save_checkpoint()
            signal_name = stop.requested or "a stop request on another rank"
            self.stop_reason = f"{signal_name}: checkpoint saved to {path}"
            self.after_work_pending = False
            self._after_step(step)  # a resumed run redoes this from the checkpoint
            return
        self._after_step(step)
        due = self.settings.save_every and step % self.settings.save_every == 0
        if due or self.time_save_agreed:
            self.save_checkpoint()

    def _after_step(self, step: int) -> None:
        """The step's outputs: log row, eval (and early stopping), samples, dashboard."""
        s, total = self.settings, self.max_steps
        row = None
        if step % s.log_every == 0 or step == total:
            row = self._log_row(step)
        at_eval = step == total or (s.eval_every and step % s.eval_every == 0)
        if self.val_data is not None and at_eval:
            row = self._evaluate(step, row)
        if row is not None:
            self.history.add(row)
            if self.metrics is not None:
                self.metrics.write(row)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{self.history.rows[-1].loss or 0:.4f}", refresh=False)
        # FSDP gathers weights in forward: every rank must take part in sampling.
        sampling_rank = self.dist.is_main or self.dist.strategy == "fsdp"
        if self.sampler and s.sample_every and step % s.sample_every == 0 and sampling_rank:
            self.sampler(self.model, step)
        if self.dashboard is not None:
            self.dashboard.maybe_refresh(step)
        if self.history.by_epoch and step % self.steps_per_epoch == 0:
            self._end_epoch(step, row)

    def _end_epoch(self, step: int, row: MetricsRow | None) -> None:
        """The Python API's history: one row per finished epoch (and one log line)."""
        loss = self._epoch_loss_sum / max(1, self._epoch_loss_count)
        self._epoch_loss_sum, self._epoch_loss_count = 0.0, 0
        epoch = EpochRow(step // self.steps_per_epoch, step, loss, self.lr_at(step - 1))
        line = f"epoch {epoch.epoch} | step {step} | train loss {loss:.4f}"
        if row is not None and row.val_loss is not None and row.step == step:
            epoch.val_loss, epoch.val_perplexity = row.val_loss, row.val_ppl
            line += f" | val loss {row.val_loss:.4f} | ppl {row.val_ppl:.3f}"
        self.history.epochs.append(epoch)
        self.log(line)

    def _log_row(self, step: int) -> MetricsRow:
        s = self.settings
        ms_per_step = 1000 * self._interval_train_s / max(1, self._interval_steps)
        self._interval_steps, self._interval_train_s = 0, 0.0
        steps_this_fit = max(1, step - self._fit_start_step)
        wall_per_step = (time.perf_counter() - self._fit_start) / steps_this_fit
        loss = self._log_loss_sum / max(1, self._log_loss_count)
        self._log_loss_sum, self._log_loss_count = 0.0, 0
        lr = self.lr_at(step - 1)
        tokens_per_s = self.tokens_seen / max(1, step) * 1000 / ms_per_step if ms_per_step else 0.0
        device_name = (
            torch.cuda.get_device_name() if self.device.type == "cuda" else self.device.type
        )
        use = mfu(s.flops_per_token, tokens_per_s, device_name, self.precision.dtype, s.peak_flops)
        memory_mb = _memory_mb(self.device)
        eta = (self.max_steps - step) * wall_per_step  # evaluations and saves included
        mfu_text = f" | mfu {100 * use:.1f}%" if use is not None else ""
        self.log(
            f"step {step:>6}/{self.max_steps} | loss {loss:.4f} | lr {lr:.2e} | "
            f"grad {self._last_grad_norm:.3f} | {ms_per_step:.1f} ms/step | "
            f"{tokens_per_s:,.0f} tok/s{mfu_text} | mem {memory_mb:,.0f} MB | "
            f"tokens {self.tokens_seen:,} | eta {_duration(eta)}"
        )
        return MetricsRow(
            step=step,
            tokens_seen=self.tokens_seen,
            elapsed_s=round(self.elapsed, 3),
            loss=loss,
            lr=lr,
            grad_norm=self._last_grad_norm,
            ms_per_step=ms_per_step,
            tokens_per_s=tokens_per_s,
            mfu=use,
            memory_mb=memory_mb,
        )

    def _evaluate(self, step: int, row: MetricsRow | None) -> MetricsRow:
        s = self.settings
        result = self.validate()
        loss = result["loss"]
        improved = loss < self.best_val_loss - s.min_delta
        line = f"eval step {step} | val loss {loss:.4f} | ppl {result['perplexity']:.3f}"
        if s.entropy_floor is not None:
            gap = loss - s.entropy_floor
            per_char = f", {gap / s.chars_per_token:+.4f}/char" if s.chars_per_token else ""
            line += f" | floor {s.entropy_floor:.4f} ({gap:+.4f} nats/token{per_char})"
            if loss < s.entropy_floor:
                line += (
                    "\n!!! validation loss is BELOW the entropy floor: this is a bug "
                    "(a leak between train and val, a mask or a loss error) !!!"
                )
        if loss < self.best_val_loss:
            self.best_val_loss = loss
            line += " | new best"
            self.save_weights(self.checkpoint_dir / "best.pt", {"val_loss": loss})
        # At a wsd schedule's held peak rate the val loss is noisy and falls mostly in the decay:
        # evaluations before the decay do not count towards early stopping (a run stopped there
        # never gets its decay: the demo's SFT on twice its data stopped at step 500 of 650, 87 %
        # of its story questions right against 97 % when it ran to the end).
        held = s.schedule == "wsd" and step <= wsd_decay_start(
            s.warmup_steps, self.max_steps, s.wsd_decay_fraction
        )
        if improved or held:
            self.evals_without_improvement = 0
        else:
            self.evals_without_improvement += 1
        self.log(line)
        if s.patience and self.evals_without_improvement >= s.patience:
            self.stop_reason = (
                f"early stopping: no val-loss improvement above {s.min_delta} for "
                f"{s.patience} evaluations (best {self.best_val_loss:.4f})"
            )
            self.log(self.stop_reason)
        row = row or MetricsRow(step, self.tokens_seen, round(self.elapsed, 3))
        row.val_loss, row.val_ppl = loss, result["perplexity"]
        return row


def _logits(output: Any) -> torch.Tensor:
    """The logits of a model's forward: a tensor, or `.logits` (Hugging Face), or `["logits"]`,
    or the first item of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        f"the model's forward returned {type(output).__name__}, not logits: return a tensor "
        "(B, T, vocab), or pass criterion= with a model that does"
    )


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


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
