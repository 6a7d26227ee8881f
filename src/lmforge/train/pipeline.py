"""One run pipeline for both phases: config -> checks -> run folder -> model/tokenizer -> batches
-> Trainer -> outputs.

`pretrain(cfg)` and `finetune(cfg)` differ only in the `Phase` they build (`train/pretrain.py`,
`train/sft.py`): where the model, the tokenizer and the batches come from. Everything else (torchrun
with DDP/FSDP2, compile, the run folder's lock and resume guards, metrics, samples, dashboard,
checkpoints, the summary and the report) is this module's, once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lmforge import __version__
from lmforge.config import Config
from lmforge.device import Precision, cpu_peak_flops, pick, setup_threads
from lmforge.distributed import Dist, agree, setup, teardown, wrap
from lmforge.errors import UserError
from lmforge.info import flops_per_token
from lmforge.train.phase import Phase
from lmforge.train.run_folder import RunFolder, Start
from lmforge.train.trainer import Trainer, TrainSettings

PhaseBuilder = Callable[[Config, Dist, Precision], Phase]


def pretrain(cfg: Config) -> int:
    """`lmforge train`: phase 1 on prepared token files."""
    from lmforge.train.pretrain import pretrain_phase

    return run(cfg, pretrain_phase)


def finetune(cfg: Config) -> int:
    """`lmforge sft`: phase 2 from a phase-1 checkpoint on instruction data."""
    from lmforge.train.sft import sft_phase

    return run(cfg, sft_phase)


def run(cfg: Config, build_phase: PhaseBuilder) -> int:
    """Train one run; returns the exit status. Nothing in the run folder is written before every
    check on the inputs and on the folder itself has passed."""
    d = setup(cfg.train.distributed)
    ended = False
    try:
        precision = pick(_rank_device(cfg.train.device, d), cfg.train.dtype)
        cpu = precision.device.type == "cpu"
        threads = setup_threads(cfg.train.threads) if cpu else torch.get_num_threads()
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        phase = agree(d, lambda: build_phase(cfg, d, precision))
        folder = RunFolder(cfg.run.dir, d)
        with folder.locked():
            start = agree(d, lambda: folder.starting_point(cfg, phase))
            trainer = _trainer(cfg, phase, d, precision, folder)
            if start is not None:
                trainer.load_state_dict(start.state)
                if trainer.global_step >= trainer.max_steps:
                    _say_finished(trainer, folder, d)
                    ended = True
                    return 0
            info = run_info(cfg, phase, precision, threads, d)
            agree(d, lambda: folder.write_start(cfg, phase, info, start))
            header = _header(cfg, phase, precision, threads, d, trainer, start)
            train_with_outputs(trainer, cfg, phase, folder, header, start)
        ended = True
    finally:
        teardown(together=ended)
    return 0


def _trainer(cfg: Config, phase: Phase, d: Dist, precision: Precision, folder: RunFolder):
    """The Trainer over the phase's model and batches; the model wrapped for DDP/FSDP2 and
    compiled as the config says. Writes nothing."""
    from lmforge.train.optim import build_optimizer

    t, m = cfg.train, phase.model.cfg
    model = phase.model
    model.activation_checkpointing = t.activation_checkpointing
    model.to(precision.device)
    train_model = wrap(model, d, precision.device, precision.dtype)  # before the optimizer: FSDP
    peak = cfg.log.peak_tflops * 1e12 or None
    if peak is None and precision.device.type == "cpu":
        peak = cpu_peak_flops(precision.dtype)  # measured once per machine, then cached
    settings = TrainSettings.from_config(
        cfg, flops_per_token=flops_per_token(m, m.context), peak_flops=peak, **phase.settings
    )
    state_extra = {"config": cfg.to_dict(), "tokenizer": phase.tokenizer.identity(),
                   "data_identity": phase.data_identity, "phase": phase.name,
                   "world_size": d.world_size}  # fmt: skip
    if phase.name == "sft":
        state_extra["tokenizer"] = phase.data_identity["tokenizer"]
    return Trainer(
        model,
        phase.train_batches,
        phase.val_batches,
        build_optimizer(model, cfg.optim, precision.device),
        device=precision,
        checkpoint_dir=folder.checkpoints,
        settings=settings,
        state_extra=state_extra,
        log=print if d.is_main else _quiet,
        compile_model=compiles(cfg, precision),
        train_model=train_model,
        dist=d,
    )


def compiles(cfg: Config, precision: Precision) -> bool:
    """train.compile: auto compiles on CUDA only. On a CPU inductor builds C++ kernels in the
    first steps (14-24 s on 2 cores with an empty cache, 2-4 s from its cache) and then fuses the
    small element-wise ops around the matrix products: 1.1-1.25x a step at nanoGPT's shape
    (4 x 128, context 64; bench/cpu_vs_nanogpt_shape.py), about 1.1x at the demo's, where
    attention over 256 positions dominates: a win on long runs only, so it is asked for."""
    wanted = cfg.train.compile == "true" or (
        cfg.train.compile == "auto" and precision.device.type == "cuda"
    )
    if wanted and precision.device.type == "cpu":
        from torch._inductor.cpp_builder import get_cpp_compiler

        try:
            get_cpp_compiler()
        except Exception:  # inductor's own search (CXX, g++, clang++): none found
            raise UserError(
                "train.compile=true on a CPU needs a C++ compiler (torch.compile builds C++ "
                "kernels) and none was found: install g++ or clang++, or use --train.compile=false"
            ) from None
    return wanted


def train_with_outputs(
    trainer: Trainer,
    cfg: Config,
    phase: Phase,
    folder: RunFolder,
    header: list[str],
    start: Start | None,
) -> None:
    """Attach the rank-0 outputs (metrics, samples, dashboard), train, then finish the run."""
    from lmforge.monitor.metrics import MetricsWriter
    from lmforge.monitor.report import LiveDashboard

    d, run = trainer.dist, folder.path
    metrics = None
    if d.is_main:
        step = trainer.global_step
        metrics = MetricsWriter(
            run / "logs",
            start_step=step,
            offsets=start.state.get("log_offsets") if start else None,
            tensorboard=cfg.log.tensorboard,
            purge_step=step + (0 if trainer.after_work_pending else 1),
        )
        trainer.metrics, trainer.log = metrics, metrics.log_line
        if cfg.log.plot_every:
            trainer.dashboard = LiveDashboard(run, cfg.log.plot_every, cfg.log.keep_plot_iterations)
    trainer.sampler = make_sampler(cfg, phase, metrics)
    try:
        for line in header:
            trainer.log(line)
        if metrics is not None and metrics.moved_aside is not None:
            trainer.log(
                f"logs of an earlier attempt (no checkpoint) moved to {metrics.moved_aside}"
            )
        wall = time.time()
        trainer.train()
        finish(trainer, phase, run, time.time() - wall)
    finally:
        if metrics is not None:
            metrics.close()


def make_sampler(cfg: Config, phase: Phase, metrics: Any) -> Callable[[Any, int], str]:
    """Periodic samples from fixed prompts (own RNG: training is unaffected), through the chat
    template for SFT; to samples.txt and the log on rank 0."""
    from lmforge.chat_format import Turn, render_prompt, stop_ids

    t, tok = cfg.train, phase.tokenizer
    stop = stop_ids(tok) if phase.chat else [tok.eot_id]

    def prompt_ids(text: str) -> list[int]:
        if phase.chat:
            return render_prompt([Turn("user", text)], tok)
        return tok.encode(text) or [tok.eot_id]

    def sample(model: torch.nn.Module, step: int) -> str:
        lines = [f"=== step {step} ==="]
        for i, prompt in enumerate(t.sample_prompts):
            out = model.generate(prompt_ids(prompt), t.sample_tokens,
                                 temperature=t.sample_temperature, seed=t.seed + i,
                                 vocab_limit=phase.vocab_limit, stop_tokens=stop)  # fmt: skip
            lines.append(f"[{prompt}] {tok.decode(out)}")
        text = "\n".join(lines)
        if metrics is not None:
            metrics.sample(text)
        return text

    return sample


def finish(trainer: Trainer, phase: Phase, run: Path, wall: float) -> None:
    """After training: a full step checkpoint (so that raising max_steps continues the run) and
    final_model.pt, unless interrupted; then the summary and the report (rank 0). A report that
    fails is a warning: the training it would describe is safe on disk."""
    from lmforge.monitor.report import LiveDashboard

    finished = trainer.stop_reason == "finished" or trainer.stop_reason.startswith("early")
    final = None
    if finished:
        if trainer.last_saved_step != trainer.global_step:
            trainer.save_checkpoint()
        final = trainer.save_weights(run / "checkpoints" / "final_model.pt")
    if not trainer.dist.is_main:
        return
    for line in summary_lines(trainer, phase, run, wall, final):
        trainer.log(line)
    try:
        paths = LiveDashboard(run, 0).final()
        trainer.log(f"report: {', '.join(str(p) for p in paths.values())}")
    except (UserError, OSError, ValueError) as e:  # e.g. no metrics rows yet, or a full disk
        trainer.log(f"warning: the report was not written ({e}); the run itself is complete: "
                    f"`lmforge report {run}` writes it later")  # fmt: skip


def summary_lines(
    trainer: Trainer, phase: Phase, run: Path, wall: float, final: Path | None
) -> list[str]:
    h = trainer.history
    floor = trainer.settings.entropy_floor
    tok_s = trainer.tokens_seen / trainer.elapsed if trainer.elapsed else 0.0
    lines = [
        f"done: {trainer.stop_reason} | steps {trainer.global_step} | tokens "
        f"{trainer.tokens_seen:,} | wall {wall:.1f} s | training {trainer.elapsed:.1f} s | "
        f"{tok_s:,.0f} tok/s"
    ]
    if h.train_loss:
        lines.append(f"train loss {h.train_loss[0]:.4f} -> {h.train_loss[-1]:.4f}")
    if h.val_loss:
        best = min(h.val_loss)
        lines.append(
            f"val loss final {h.val_loss[-1]:.4f} (ppl {math.exp(h.val_loss[-1]):.3f}), "
            f"best {best:.4f} at step {h.val_step[h.val_loss.index(best)]}"
        )
        if floor is not None:
            per_char = trainer.settings.chars_per_token
            char = f" ({(best - floor) / per_char:+.4f} per char)" if per_char else ""
            lines.append(f"entropy floor {floor:.4f}: best val loss is {best - floor:+.4f} "
                         f"nats/token from it{char}")  # fmt: skip
    if trainer.skipped_steps:
        lines.append(f"steps skipped for a non-finite gradient: {trainer.skipped_steps}")
    dashboard = trainer.dashboard
    if dashboard is not None and trainer.elapsed:
        lines.append(
            f"live dashboard: {dashboard.seconds:.1f} s of refreshes, "
            f"{100 * dashboard.seconds / trainer.elapsed:.2f} % of training time"
        )
    if final is not None:
        lines.append(f"final model: {final}")
    lines.append(f"run folder: {run}")
    return lines


def run_info(
    cfg: Config, phase: Phase, precision: Precision, threads: int, d: Dist
) -> dict[str, Any]:
    """What `run_info.json` records: the report reads model and training settings from it."""
    m, t = phase.model.cfg, cfg.train
    return {
        "phase": phase.name,
        "tokenizer": phase.tokenizer.identity(),
        "flops_per_token": flops_per_token(m, m.context),
        "model": {**m.__dict__, "padded_vocab_size": m.padded_vocab},
        "train": {"batch_size": t.batch_size, "grad_accum": t.grad_accum, "context": m.context,
                  "world_size": d.world_size, "lr": cfg.optim.lr, "min_lr": cfg.optim.min_lr,
                  "schedule": cfg.schedule.kind, "optimizer": cfg.optim.name,
                  "max_steps": t.max_steps, "max_epochs": phase.settings.get("max_epochs",
                                                                          t.max_epochs),
                  "device": str(precision.device), "dtype": precision.dtype,
                  "threads": threads},
        "lmforge": __version__,
        "torch": str(torch.__version__),
        **phase.run_info,
    }  # fmt: skip


def _header(cfg: Config, phase: Phase, precision: Precision, threads: int, d: Dist,
            trainer: Trainer, start: Start | None) -> list[str]:  # fmt: skip
    first = f"lmforge {__version__} {phase.name} | {precision.describe()} | threads {threads}"
    if trainer.compiled:
        first += " | compiled"
    if d.enabled:
        first += (
            f" | {d.strategy} on {d.world_size} process{'es' * (d.world_size > 1)} ({d.backend})"
        )
    lines = [first, *phase.describe]
    s = trainer.settings
    lines.append(f"{trainer.max_steps:,} steps of {cfg.train.batch_size} x "
                 f"{cfg.train.grad_accum} x {d.world_size}, eval every {s.eval_every or 'end'}, "
                 f"save every {s.save_every or 'end'}")  # fmt: skip
    lines += phase.warnings
    if cfg.schedule.warmup_steps >= trainer.max_steps:
        lines.append(
            f"warning: schedule.warmup_steps ({cfg.schedule.warmup_steps}) >= the run's "
            f"{trainer.max_steps} steps: the learning rate never reaches optim.lr"
        )
    if start is not None:
        lines.append(f"resumed from {start.path} at step {start.step}")
        if start.changes:
            lines.append("changed since that checkpoint: " + "; ".join(start.changes))
    return lines


def _say_finished(trainer: Trainer, folder: RunFolder, d: Dist) -> None:
    if d.is_main:
        print(
            f"{folder.path} already finished at step {trainer.global_step} (max_steps "
            f"{trainer.max_steps}): nothing to train; raise --train.max_steps to go on"
        )


def _quiet(_: str) -> None:
    """The log of ranks other than 0: they train, only rank 0 speaks."""


def _rank_device(device: str, d: Dist) -> str:
    """Under torchrun on CUDA each process drives the GPU of its local rank."""
    if d.enabled and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{d.local_rank}"
    return device
