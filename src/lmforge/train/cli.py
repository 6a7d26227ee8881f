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
    log,
) -> Any:
    """Periodic samples from fixed prompts into logs/samples.txt (own RNG: training unaffected)."""

    def sample(model: torch.nn.Module, step: int) -> str:
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
        with open(run / "logs" / "samples.txt", "a", encoding="utf-8") as f:
            f.write(text + "\n\n")
        log(text)
        return text

    return sample


def train_from_config(cfg: Config) -> int:
    from lmforge.data.memmap import TokenBatches
    from lmforge.monitor.metrics import MetricsWriter
    from lmforge.monitor.report import LiveDashboard
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
    precision = pick(t.device, t.dtype)
    threads = (
        setup_threads(t.threads) if precision.device.type == "cpu" else torch.get_num_threads()
    )
    torch.manual_seed(t.seed)
    tokenizer = load_tokenizer(data_dir)
    run = Path(cfg.run.dir)
    resuming = t.resume != "none" and any((run / "checkpoints").glob("step_*.pt"))
    run = prepare_run_dir(cfg, resuming)
    tokenizer.save(run / "tokenizer")  # generate/chat/export find it beside the checkpoints
    checkpoints = run / "checkpoints"

    model = Transformer(m)
    if t.init_from:
        from lmforge.train.checkpoint import load_weights_into

        load_weights_into(model, t.init_from)
    model.activation_checkpointing = t.activation_checkpointing
    floor = meta.get("entropy_floor_nats_per_token")
    fpt = flops_per_token(m, m.context)
    n_params = count_parameters(m)
    info = {
        "params": n_params,
        "phase": "pretrain",
        "tokenizer": meta.get("tokenizer", {}),
        "entropy_floor": floor,
        "flops_per_token": fpt,
        "model": {**m.__dict__, "padded_vocab_size": m.padded_vocab},
        "train": {
            "batch_size": t.batch_size,
            "grad_accum": t.grad_accum,
            "context": m.context,
            "lr": cfg.optim.lr,
            "min_lr": cfg.optim.min_lr,
            "schedule": cfg.schedule.kind,
            "optimizer": cfg.optim.name,
            "max_steps": t.max_steps,
            "device": str(precision.device),
            "dtype": precision.dtype,
            "threads": threads,
        },
        "data": str(data_dir),
        "lmforge": __version__,
        "torch": str(torch.__version__),
    }
    (run / "run_info.json").write_text(
        json.dumps(info, indent=2, default=str) + "\n", encoding="utf-8"
    )

    train_batches = TokenBatches(
        data_dir / "train.bin",
        m.context,
        t.batch_size,
        t.seed,
        device=precision.device,
        mode=cfg.data.mode,
        stride=cfg.data.stride or None,
        grad_accum=t.grad_accum,
    )
    val_batches = TokenBatches(
        data_dir / "val.bin", m.context, t.batch_size, t.seed + 1, device=precision.device
    )
    optimizers = default_optimizer(
        model,
        cfg.optim.name,
        cfg.optim.lr,
        cfg.optim.weight_decay,
        (cfg.optim.beta1, cfg.optim.beta2),
        cfg.optim.eps,
        cfg.optim.muon_lr,
        cfg.optim.muon_momentum,
        precision.device,
    )
    settings = TrainSettings(
        max_steps=t.max_steps,
        max_epochs=t.max_epochs,
        grad_accum=t.grad_accum,
        max_grad_norm=t.max_grad_norm,
        lr=cfg.optim.lr,
        min_lr=cfg.optim.min_lr,
        schedule=cfg.schedule.kind,
        warmup_steps=cfg.schedule.warmup_steps,
        decay_steps=cfg.schedule.decay_steps,
        wsd_decay_fraction=cfg.schedule.wsd_decay_fraction,
        log_every=cfg.log.log_every,
        eval_every=t.eval_every,
        eval_batches=t.eval_batches,
        save_every=t.save_every,
        save_every_minutes=t.save_every_minutes,
        keep_last=t.keep_last,
        sample_every=t.sample_every,
        patience=t.patience,
        min_delta=t.min_delta,
        warmup_passes=t.warmup_passes,
        seed=t.seed,
        entropy_floor=floor,
        flops_per_token=fpt,
        peak_flops=cfg.log.peak_tflops * 1e12 or None,
        progress=_progress_wanted(cfg.log.progress),
    )
    compile_model = cfg.train.compile == "true" or (
        cfg.train.compile == "auto" and precision.device.type == "cuda"
    )
    state_extra = {
        "config": cfg.to_dict(),
        "tokenizer": meta.get("tokenizer", {}),
        "data_meta": {
            k: meta.get(k)
            for k in (
                "vocab_size",
                "dtype",
                "train_tokens",
                "val_tokens",
                "entropy_floor_nats_per_token",
            )
        },
    }
    # Resume first: it decides whether the metrics files are continued or started fresh.
    probe = Trainer(
        model,
        train_batches,
        val_batches,
        optimizers,
        device=precision,
        checkpoint_dir=checkpoints,
        settings=settings,
        state_extra=state_extra,
        log=print,
    )
    resumed_from = probe.resume(t.resume)
    if resumed_from is not None:
        _check_same_run(probe, meta)
    metrics = MetricsWriter(
        run / "logs",
        resume_step=probe.global_step if resumed_from else None,
        tensorboard=cfg.log.tensorboard,
        fresh=resumed_from is None,
    )
    trainer = probe
    trainer.metrics, trainer.log = metrics, metrics.log_line
    if compile_model:
        trainer.train_model = torch.compile(model)
    trainer.dashboard = (
        LiveDashboard(run, cfg.log.plot_every, cfg.log.keep_plot_iterations)
        if cfg.log.plot_every
        else None
    )
    vocab_limit = int(meta["vocab_size"])
    trainer.sampler = make_sampler(
        run,
        tokenizer,
        t.sample_prompts,
        t.sample_tokens,
        t.sample_temperature,
        t.seed,
        vocab_limit,
        metrics.log_line,
    )
    log = metrics.log_line
    log(f"lmforge {__version__} | {precision.describe()} | threads {threads}")
    log(
        f"model {m.preset}: {n_params:,} parameters ({m.block}, {m.n_layers}x{m.dim}, "
        f"{m.n_heads} heads, context {m.context}, vocab {m.vocab_size} padded to {m.padded_vocab})"
    )
    log(
        f"data {data_dir}: {meta.get('train_tokens', 0):,} train / {meta.get('val_tokens', 0):,} "
        f"val tokens, tokenizer {meta.get('tokenizer', {}).get('name', '?')}"
        + (f", entropy floor {floor:.4f} nats/token" if floor is not None else "")
    )
    if resumed_from is not None:
        log(f"resumed from {resumed_from} at step {trainer.global_step}")
    elif t.resume not in ("auto", "none"):
        raise UserError(f"train.resume: could not resume from {t.resume}")
    start = time.time()
    try:
        trainer.train()
        wall = time.time() - start
        finished = trainer.stop_reason == "finished" or trainer.stop_reason.startswith("early")
        final = trainer.save_weights(checkpoints / "final_model.pt") if finished else None
        summarise(trainer, run, floor, wall, final, log)
        try:
            paths = LiveDashboard(run, 0).final()
            log(f"report: {', '.join(str(p) for p in paths.values())}")
        except UserError as e:  # e.g. no metrics rows yet: the run itself is fine
            log(f"report skipped: {e}")
    finally:
        metrics.close()
    return 0


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
