"""`lmforge train`: config -> run folder -> Trainer over the memmapped token files.

A thin layer: it resolves the config, checks that data and model agree, lays out the run folder
and wires the Trainer to the metrics files, samples, dashboard and checkpoints.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from lmforge import __version__
from lmforge.config import Config, load_config, save_config
from lmforge.device import pick, setup_threads
from lmforge.distributed import Dist, setup, teardown, wrap
from lmforge.errors import UserError
from lmforge.info import count_parameters, flops_per_token
from lmforge.model import Transformer
from lmforge.train.trainer import Trainer, TrainSettings, default_optimizer


def resolve_config(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)


def run_train(args: argparse.Namespace) -> int:
    cfg = resolve_config(args)
    return train_from_config(cfg)


def run_sft(args: argparse.Namespace) -> int:
    from lmforge.train.sft import sft_from_config

    cfg = resolve_config(args)
    if args.init_from:
        cfg.train.init_from = args.init_from
    return sft_from_config(cfg)


def read_data_meta(data_dir: str) -> dict[str, Any]:
    if not data_dir:
        raise UserError(
            "data.dir is not set: point it at a folder made by `lmforge prepare` "
            "(e.g. --data.dir=data/stories)"
        )
    from lmforge.data.memmap import read_meta

    return read_meta(data_dir)


def prepare_run_dir(cfg: Config, resuming: bool) -> Path:
    run = Path(cfg.run.dir)
    for sub in ("logs", "checkpoints", "training_plots"):
        (run / sub).mkdir(parents=True, exist_ok=True)
    previous = run / "config.yaml"
    if previous.exists() and resuming:
        previous.replace(run / "config.previous.yaml")  # kept: what the earlier part ran with
    save_config(cfg, previous)
    return run


def make_sampler(
    run: Path,
    tokenizer,
    prompts: list[str],
    tokens: int,
    temperature: float,
    seed: int,
    vocab_limit: int,
):
    """Periodic samples from fixed prompts into logs/samples.txt (own RNG: training unaffected).
    Returns sample(model, step, log): `log` None on ranks that only take part (FSDP)."""

    def sample(model: torch.nn.Module, step: int, log) -> str:
        lines = [f"=== step {step} ==="]
        for i, prompt in enumerate(prompts):
            ids = tokenizer.encode(prompt) or [tokenizer.eot_id]
            out = model.generate(
                ids,
                tokens,
                temperature=temperature,
                seed=seed + i,
                vocab_limit=vocab_limit,
                stop_tokens=[tokenizer.eot_id],
            )
            lines.append(f"[{prompt}] {tokenizer.decode(out)}")
        text = "\n".join(lines)
        if log is not None:
            with open(run / "logs" / "samples.txt", "a", encoding="utf-8") as f:
                f.write(text + "\n\n")
            log(text)
        return text

    return sample


def settings_from(cfg: Config, floor: float | None, fpt: int) -> TrainSettings:
    """The loop's settings from the config (one flat dataclass the Trainer API also takes)."""
    t, o, sch = cfg.train, cfg.optim, cfg.schedule
    return TrainSettings(
        max_steps=t.max_steps, max_epochs=t.max_epochs, grad_accum=t.grad_accum,
        max_grad_norm=t.max_grad_norm, lr=o.lr, min_lr=o.min_lr, schedule=sch.kind,
        warmup_steps=sch.warmup_steps, decay_steps=sch.decay_steps,
        wsd_decay_fraction=sch.wsd_decay_fraction, log_every=cfg.log.log_every,
        eval_every=t.eval_every, eval_batches=t.eval_batches, save_every=t.save_every,
        save_every_minutes=t.save_every_minutes, keep_last=t.keep_last,
        sample_every=t.sample_every, patience=t.patience, min_delta=t.min_delta,
        warmup_passes=t.warmup_passes, seed=t.seed, entropy_floor=floor, flops_per_token=fpt,
        peak_flops=cfg.log.peak_tflops * 1e12 or None, progress=_progress_wanted(cfg.log.progress),
    )  # fmt: skip


def run_info(
    cfg: Config, meta: dict[str, Any], precision, threads: int, d: Dist, phase: str = "pretrain"
) -> dict[str, Any]:
    """What `run_info.json` records: the report reads model and training settings from it."""
    m, t = cfg.model, cfg.train
    return {
        "params": count_parameters(m), "phase": phase, "tokenizer": meta.get("tokenizer", {}),
        "entropy_floor": meta.get("entropy_floor_nats_per_token"),
        "flops_per_token": flops_per_token(m, m.context),
        "model": {**m.__dict__, "padded_vocab_size": m.padded_vocab},
        "train": {"batch_size": t.batch_size, "grad_accum": t.grad_accum, "context": m.context,
                  "world_size": d.world_size, "lr": cfg.optim.lr, "min_lr": cfg.optim.min_lr,
                  "schedule": cfg.schedule.kind, "optimizer": cfg.optim.name,
                  "max_steps": t.max_steps, "device": str(precision.device),
                  "dtype": precision.dtype, "threads": threads},
        "data": cfg.data.dir, "lmforge": __version__, "torch": str(torch.__version__),
    }  # fmt: skip


def train_from_config(cfg: Config) -> int:
    from lmforge.data.memmap import TokenBatches
    from lmforge.tokenizers import load_tokenizer

    meta = read_data_meta(cfg.data.dir)
    data_dir = Path(cfg.data.dir)
    if meta.get("kind") == "instruction" and not cfg.data.allow_instruction_data:
        raise UserError(
            f"{data_dir} holds instruction data: phase 1 trains on plain text "
            "(use `lmforge sft`, or --data.allow_instruction_data=true)"
        )
    cfg.model.vocab_size = int(meta["vocab_size"])
    t, m = cfg.train, cfg.model
    d = setup(t.distributed)
    precision = pick(_rank_device(t.device, d), t.dtype)
    on_cpu = precision.device.type == "cpu"
    threads = setup_threads(t.threads) if on_cpu else torch.get_num_threads()
    torch.manual_seed(t.seed)  # the same initial weights on every rank
    tokenizer = load_tokenizer(data_dir)
    run = Path(cfg.run.dir)
    if d.is_main:
        resuming = t.resume != "none" and any((run / "checkpoints").glob("step_*.pt"))
        prepare_run_dir(cfg, resuming)
        tokenizer.save(run / "tokenizer")  # generate/chat/export find it beside the checkpoints
        info = run_info(cfg, meta, precision, threads, d)
        (run / "run_info.json").write_text(
            json.dumps(info, indent=2, default=str) + "\n", encoding="utf-8"
        )
    d.barrier()

    model = Transformer(m)
    if t.init_from:
        from lmforge.export import init_from_hf, is_hf_folder
        from lmforge.train.checkpoint import load_weights_into

        if is_hf_folder(t.init_from):  # a Hugging Face Llama / GPT-2 folder
            init_from_hf(model, t.init_from)
        else:
            load_weights_into(model, t.init_from)
    model.activation_checkpointing = t.activation_checkpointing
    model.to(precision.device)
    train_model = wrap(model, d, precision.device, precision.dtype)  # before the optimizer: FSDP
    optimizers = default_optimizer(
        model, cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay,
        (cfg.optim.beta1, cfg.optim.beta2), cfg.optim.eps, cfg.optim.muon_lr,
        cfg.optim.muon_momentum, precision.device)  # fmt: skip
    batches = dict(rank=d.rank, world_size=d.world_size, device=precision.device)
    train_batches = TokenBatches(
        data_dir / "train.bin",
        m.context,
        t.batch_size,
        t.seed,
        mode=cfg.data.mode,
        stride=cfg.data.stride or None,
        grad_accum=t.grad_accum,
        **batches,
    )
    doc = cfg.data.mode == "doc"  # then validation scores whole documents, as the floor does
    val_batches = TokenBatches(
        data_dir / "val.bin",
        m.context,
        t.batch_size,
        t.seed + 1,
        mode="doc" if doc else "random",
        first_doc_only=doc,
        **batches,
    )
    floor = meta.get("entropy_floor_nats_per_token")
    keys = ("vocab_size", "dtype", "train_tokens", "val_tokens", "entropy_floor_nats_per_token")
    state_extra = {
        "config": cfg.to_dict(),
        "tokenizer": meta.get("tokenizer", {}),
        "data_meta": {k: meta.get(k) for k in keys},
        "phase": "pretrain",
    }
    compile_model = t.compile == "true" or (t.compile == "auto" and precision.device.type == "cuda")
    trainer = Trainer(
        model,
        train_batches,
        val_batches,
        optimizers,
        device=precision,
        checkpoint_dir=run / "checkpoints",
        settings=settings_from(cfg, floor, flops_per_token(m, m.context)),
        state_extra=state_extra,
        log=print if d.is_main else _quiet,
        compile_model=compile_model,
        train_model=train_model,
        dist=d,
    )
    resumed_from = trainer.resume(t.resume)
    if resumed_from is None and t.resume not in ("auto", "none"):
        raise UserError(f"train.resume: could not resume from {t.resume}")
    if resumed_from is not None:
        _check_same_run(trainer, meta)
    sampler = make_sampler(
        run,
        tokenizer,
        t.sample_prompts,
        t.sample_tokens,
        t.sample_temperature,
        t.seed,
        int(meta["vocab_size"]),
    )
    header = [
        f"lmforge {__version__} | {precision.describe()} | threads {threads}"
        + (" | compiled" if compile_model else "")
        + (f" | {d.strategy} on {d.world_size} process{'es' * (d.world_size > 1)} ({d.backend})"
           if d.enabled else ""),
        f"model {m.preset}: {count_parameters(m):,} parameters ({m.block}, "
        f"{m.n_layers}x{m.dim}, {m.n_heads} heads"
        + (f", canon {m.canon}" if m.canon else "")
        + f", context {m.context}, vocab "
        f"{m.vocab_size} padded to {m.padded_vocab})",
        f"data {data_dir}: {meta.get('train_tokens', 0):,} train / "
        f"{meta.get('val_tokens', 0):,} val tokens, tokenizer "
        f"{meta.get('tokenizer', {}).get('name', '?')}"
        + (f", entropy floor {floor:.4f} nats/token" if floor is not None else ""),
    ]
    if resumed_from is not None:
        header.append(f"resumed from {resumed_from} at step {trainer.global_step}")
    ended_normally = False
    try:
        run_loop(trainer, cfg, run, d, resumed_from, sampler, header, floor)
        ended_normally = True
    finally:
        teardown(together=ended_normally)
    return 0


def run_loop(
    trainer: Trainer,
    cfg: Config,
    run: Path,
    d: Dist,
    resumed_from: Path | None,
    sampler,
    header: list[str],
    floor: float | None,
) -> None:
    """Attach the rank-0 outputs (metrics, dashboard, samples), train, summarise, report."""
    from lmforge.monitor.metrics import MetricsWriter
    from lmforge.monitor.report import LiveDashboard

    metrics = None
    if d.is_main:
        metrics = MetricsWriter(
            run / "logs",
            tensorboard=cfg.log.tensorboard,
            resume_step=trainer.global_step if resumed_from else None,
            fresh=resumed_from is None,
        )
        trainer.metrics, trainer.log = metrics, metrics.log_line
        if cfg.log.plot_every:
            trainer.dashboard = LiveDashboard(run, cfg.log.plot_every, cfg.log.keep_plot_iterations)
    log = trainer.log
    trainer.sampler = lambda model, step: sampler(model, step, log if d.is_main else None)
    for line in header:
        log(line)
    try:
        train_and_finish(trainer, run, floor, log)
    finally:
        if metrics is not None:
            metrics.close()


def train_and_finish(trainer: Trainer, run: Path, floor: float | None, log) -> None:
    """Train; then final_model.pt (unless interrupted), the summary and the report (rank 0)."""
    from lmforge.monitor.report import LiveDashboard

    start = time.time()
    trainer.train()
    wall = time.time() - start
    finished = trainer.stop_reason == "finished" or trainer.stop_reason.startswith("early")
    final = trainer.save_weights(run / "checkpoints" / "final_model.pt") if finished else None
    if not trainer.dist.is_main:
        return
    summarise(trainer, run, floor, wall, final, log)
    try:
        paths = LiveDashboard(run, 0).final()
        log(f"report: {', '.join(str(p) for p in paths.values())}")
    except UserError as e:  # e.g. no metrics rows yet: the run itself is fine
        log(f"report skipped: {e}")


def _quiet(_: str) -> None:
    """The log of ranks other than 0: they train, only rank 0 speaks."""


def _rank_device(device: str, d: Dist) -> str:
    """Under torchrun on CUDA each process drives the GPU of its local rank."""
    if d.enabled and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{d.local_rank}"
    return device


def _check_same_run(trainer: Trainer, meta: dict[str, Any]) -> None:
    """A checkpoint resumes only with the tokenizer (and so the data) it was trained on."""
    from lmforge.tokenizers import check_same_tokenizer

    saved = trainer.checkpoint_extra.get("tokenizer")
    if saved:
        check_same_tokenizer(
            saved, meta.get("tokenizer", {}), "the checkpoint's tokenizer and data.dir's"
        )


def summarise(
    trainer: Trainer, run: Path, floor: float | None, wall: float, final: Path | None, log
) -> None:
    h = trainer.history
    steps = trainer.global_step
    tok_s = trainer.tokens_seen / trainer.elapsed if trainer.elapsed else 0.0
    lines = [
        f"done: {trainer.stop_reason} | steps {steps} | tokens {trainer.tokens_seen:,} | "
        f"wall {wall:.1f} s | training {trainer.elapsed:.1f} s | {tok_s:,.0f} tok/s"
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
            lines.append(
                f"entropy floor {floor:.4f}: best val loss is {best - floor:+.4f} nats/token "
                f"from it"
            )
    dashboard = trainer.dashboard
    if dashboard is not None and trainer.elapsed:
        lines.append(f"live dashboard: {dashboard.seconds:.1f} s of refreshes, "
                     f"{100 * dashboard.seconds / trainer.elapsed:.2f} % of training time")
    if final is not None:
        lines.append(f"final model: {final}")
    lines.append(f"run folder: {run}")
    for line in lines:
        log(line)


def _progress_wanted(setting: str) -> bool:
    import sys

    if setting == "auto":
        return sys.stderr.isatty()
    return setting == "true"
