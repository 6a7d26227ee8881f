"""`lmforge sft`: instruction-tune a phase-1 checkpoint (SPEC §5).

The same loop, run folder, metrics and checkpoints as `lmforge train`; what differs is where the
pieces come from: the model shape and tokenizer from the init checkpoint (weights only, fresh
optimizer), the batches from instruction files rendered with the chat template, and the loss
normalised by the assistant tokens of the whole step (`loss_normalisation="tokens"`).
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge import __version__
from lmforge.config import N_CHAT_TOKENS, Config, ModelConfig
from lmforge.data.instruct import (
    Conversation,
    Example,
    SFTBatches,
    Turn,
    chat_ids,
    load_sources,
    render_all,
    render_prompt,
)
from lmforge.device import pick, setup_threads
from lmforge.distributed import Dist
from lmforge.errors import UserError
from lmforge.info import flops_per_token
from lmforge.model import Transformer
from lmforge.train.checkpoint import load_model, load_run_tokenizer
from lmforge.train.cli import _progress_wanted, prepare_run_dir, run_info, train_and_finish
from lmforge.train.trainer import Batches, Trainer, TrainSettings, default_optimizer

PHASE = "sft"


class InstructionBatches(Batches):
    """`SFTBatches` behind the Trainer's `Batches` interface (micro-batches run on across
    steps and epochs, so step s with accumulation g reads micro-batches s*g .. s*g+g-1)."""

    def __init__(self, inner: SFTBatches, grad_accum: int = 1):
        self.inner, self.grad_accum = inner, grad_accum
        self.batches_per_epoch = inner.batches_per_epoch

    def get(self, step: int, micro_step: int) -> dict[str, torch.Tensor]:
        batch = self.inner.get(step, micro_step, self.grad_accum)
        batch.pop("attention_mask", None)  # right padding: causal attention already ignores it
        return batch

    def epoch_of(self, step: int) -> int:
        return step * self.grad_accum // self.batches_per_epoch


# ------------------------------------------------------------------------------ the init model
def chat_ready_model(model: Transformer, tokenizer_vocab: int) -> tuple[Transformer, bool]:
    """The model with rows for the chat tokens: as is when its padded vocabulary has them,
    else a copy with the embedding (and an untied head) extended, new rows = the mean row."""
    cfg = model.cfg
    if cfg.padded_vocab >= tokenizer_vocab + N_CHAT_TOKENS:
        return model, False
    # pad_vocab_multiple <= 1 is the only way to have no spare rows; pad as phase 1 would have.
    bigger = Transformer(replace(cfg, pad_vocab_multiple=64))
    state = model.state_dict()
    for key in ("wte.weight", "lm_head.weight"):
        old = state[key]
        mean = old.mean(dim=0, keepdim=True)
        new_rows = mean.expand(bigger.cfg.padded_vocab - old.shape[0], -1)
        state[key] = torch.cat([old, new_rows], dim=0)
    bigger.load_state_dict(state)
    return bigger, True


def _model_from_checkpoint(init_from: str) -> tuple[Transformer, dict[str, Any]]:
    if not init_from:
        raise UserError("lmforge sft needs --init-from CKPT_OR_RUN: the phase-1 checkpoint or "
                        "run folder to start from")
    return load_model(init_from)


# ----------------------------------------------------------------------------------- the data
def _declared_tokenizer(path: Path) -> dict[str, Any] | None:
    """The tokenizer a data file declares: the meta.json of the prepared folder it sits in."""
    meta = path.parent / "meta.json"
    if not meta.is_file():
        return None
    try:
        return json.loads(meta.read_text(encoding="utf-8")).get("tokenizer")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None


def check_data_tokenizer(spec: str, identity: dict[str, Any]) -> None:
    """Refuse prepared token folders (already tokenized, no roles) and data prepared for another
    tokenizer than the checkpoint's; raw instruction files are encoded with the checkpoint's."""
    from lmforge.tokenizers import check_same_tokenizer

    for item in (s.strip() for s in spec.split(",") if s.strip()):
        path = Path(item.split(":", 1)[1] if _has_format_prefix(item) else item).expanduser()
        if path.is_dir() and (path / "meta.json").is_file():
            raise UserError(f"{path} is a prepared token folder (train.bin): instruction tuning "
                            "reads JSON/JSONL files; name them, e.g. "
                            f"stories-qa:{path / 'qa_train.jsonl'}")
        declared = _declared_tokenizer(path) if path.is_file() else None
        if declared:
            check_same_tokenizer(identity, declared,
                                 f"the init checkpoint and {path.parent / 'meta.json'}")


def _has_format_prefix(item: str) -> bool:
    from lmforge.data.instruct import FORMATS

    prefix, sep, _ = item.partition(":")
    return bool(sep) and prefix.strip().lower() in FORMATS


def split_conversations(conversations: list[Conversation], val_fraction: float,
                        seed: int) -> tuple[list[Conversation], list[Conversation]]:
    """Seeded split by whole conversation: no conversation is in both train and val."""
    n = len(conversations)
    if n < 2:
        raise UserError(f"the SFT data holds {n} conversation(s): at least 2 are needed "
                        "(one for training, one for validation)")
    n_val = min(n - 1, max(1, round(val_fraction * n)))
    order = np.random.default_rng([seed, 7]).permutation(n)
    val = set(order[:n_val].tolist())
    train = [c for i, c in enumerate(conversations) if i not in val]
    return train, [conversations[i] for i in sorted(val)]


def unknown_fraction(examples: list[Example], tokenizer: Any) -> float:
    """Share of ids that are the tokenizer's unknown id (a char vocabulary meeting new text)."""
    unk = getattr(tokenizer, "unk_id", None)
    total = sum(len(ids) for ids, _ in examples)
    if unk is None or not total:
        return 0.0
    return sum(ids.count(unk) for ids, _ in examples) / total


def _render(conversations: list[Conversation], tokenizer: Any, context: int,
            what: str) -> list[Example]:
    rendered = render_all(conversations, tokenizer, max_len=context)
    if not rendered.examples:
        raise UserError(f"no {what} examples left: every assistant reply lies beyond the "
                        f"model's context ({context} tokens)")
    return rendered.examples


# ---------------------------------------------------------------------------- the run itself
def _check_run_dir(run: Path, init_checkpoint: Path) -> None:
    """Never continue a pretraining run as SFT (resume=auto would load its step checkpoints)."""
    if run.resolve() in (init_checkpoint.parent.parent.resolve(), init_checkpoint.parent.resolve()):
        raise UserError(f"run.dir {run} is the run being started from: choose a new --run.dir "
                        "for the instruction-tuning run")
    info = run / "run_info.json"
    if info.is_file():
        try:
            phase = json.loads(info.read_text(encoding="utf-8")).get("phase")
        except (json.JSONDecodeError, UnicodeDecodeError):
            phase = None
        if phase != PHASE:
            raise UserError(f"run.dir {run} holds a {phase or 'non-SFT'} run: choose a new "
                            "--run.dir for the instruction-tuning run")


def _sampler(run: Path, tokenizer: Any, prompts: list[str], tokens: int, temperature: float,
             seed: int, log) -> Any:
    """Periodic answers to fixed user prompts, through the chat template, into logs/samples.txt."""
    ids = chat_ids(tokenizer)
    stop = [ids.end, ids.user, tokenizer.eot_id]

    def sample(model: torch.nn.Module, step: int) -> str:
        lines = [f"=== step {step} ==="]
        for i, prompt in enumerate(prompts):
            prompt_ids = render_prompt([Turn("user", prompt)], tokenizer)
            out = model.generate(prompt_ids, tokens, temperature=temperature, seed=seed + i,
                                 vocab_limit=tokenizer.vocab_size + N_CHAT_TOKENS,
                                 stop_tokens=stop)
            lines.append(f"[{prompt}] {tokenizer.decode(out)}")
        text = "\n".join(lines)
        with open(run / "logs" / "samples.txt", "a", encoding="utf-8") as f:
            f.write(text + "\n\n")
        log(text)
        return text

    return sample


def _settings(cfg: Config, steps_per_epoch: int, fpt: int) -> TrainSettings:
    t, s = cfg.train, cfg.sft
    return TrainSettings(
        max_steps=t.max_steps, max_epochs=s.max_epochs, grad_accum=t.grad_accum,
        max_grad_norm=t.max_grad_norm, lr=cfg.optim.lr, min_lr=cfg.optim.min_lr,
        schedule=cfg.schedule.kind, warmup_steps=cfg.schedule.warmup_steps,
        decay_steps=cfg.schedule.decay_steps, wsd_decay_fraction=cfg.schedule.wsd_decay_fraction,
        log_every=cfg.log.log_every, eval_every=t.eval_every or steps_per_epoch,
        eval_batches=t.eval_batches, save_every=t.save_every,
        save_every_minutes=t.save_every_minutes, keep_last=t.keep_last,
        sample_every=t.sample_every, patience=s.patience, min_delta=s.min_delta,
        warmup_passes=t.warmup_passes, seed=t.seed, loss_normalisation="tokens",
        flops_per_token=fpt, peak_flops=cfg.log.peak_tflops * 1e12 or None,
        progress=_progress_wanted(cfg.log.progress))


def _check_resume(trainer: Trainer, batches: SFTBatches, identity: dict[str, Any]) -> None:
    from lmforge.tokenizers import check_same_tokenizer

    saved = trainer.checkpoint_extra
    if saved.get("tokenizer"):
        check_same_tokenizer(saved["tokenizer"], identity, "the run's checkpoint and --init-from")
    if saved.get("data_meta"):
        batches.load_state_dict(saved["data_meta"])


def sft_from_config(cfg: Config) -> int:
    """Run `lmforge sft` for a resolved config; returns the exit status."""
    from lmforge.monitor.metrics import MetricsWriter
    from lmforge.monitor.report import LiveDashboard

    t, s = cfg.train, cfg.sft
    # Everything that can be wrong with the inputs is checked before the run folder is touched.
    model, init_state = _model_from_checkpoint(t.init_from)
    init_path = Path(init_state["path"])  # the file a run folder resolved to
    tokenizer = load_run_tokenizer(init_state)
    identity = init_state.get("tokenizer") or tokenizer.identity()
    run = Path(cfg.run.dir)
    _check_run_dir(run, init_path)
    if not s.data:
        raise UserError("sft.data is not set: name instruction files, e.g. "
                        "--sft.data=stories-qa:data/stories/qa_train.jsonl")
    check_data_tokenizer(s.data, identity)
    conversations = load_sources(s.data, s.weights or None, skip_bad=s.skip_bad, seed=t.seed,
                                 allow_plain_text=s.allow_plain_text,
                                 questions_per_story=s.questions_per_story)
    model, extended = chat_ready_model(model, tokenizer.vocab_size)
    m: ModelConfig = model.cfg
    cfg.model = m  # the checkpoint's shape, not the YAML's: config.yaml records what ran
    train_conv, val_conv = split_conversations(list(conversations), s.val_fraction, t.seed)
    train_examples = _render(train_conv, tokenizer, m.context, "training")
    val_examples = _render(val_conv, tokenizer, m.context, "validation")
    pad = chat_ids(tokenizer).pad
    train_sft = SFTBatches(train_examples, t.batch_size, t.seed, pad_id=pad, pack=s.pack,
                           seq_len=m.context)
    val_sft = SFTBatches(val_examples, t.batch_size, t.seed + 1, pad_id=pad, pack=s.pack,
                         seq_len=m.context)

    precision = pick(t.device, t.dtype)
    on_cpu = precision.device.type == "cpu"
    threads = setup_threads(t.threads) if on_cpu else torch.get_num_threads()
    torch.manual_seed(t.seed)
    model.activation_checkpointing = t.activation_checkpointing
    fpt = flops_per_token(m, m.context)
    steps_per_epoch = max(1, math.ceil(train_sft.batches_per_epoch / t.grad_accum))
    optimizers = default_optimizer(model, cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay,
                                   (cfg.optim.beta1, cfg.optim.beta2), cfg.optim.eps,
                                   cfg.optim.muon_lr, cfg.optim.muon_momentum, precision.device)
    # "data_meta" is the key the Trainer hands back on resume: it fingerprints the SFT data.
    state_extra = {"config": cfg.to_dict(), "tokenizer": identity, "phase": PHASE,
                   "data_meta": train_sft.state_dict()}
    checkpoints = run / "checkpoints"
    trainer = Trainer(model, InstructionBatches(train_sft, t.grad_accum),
                      InstructionBatches(val_sft), optimizers, device=precision,
                      checkpoint_dir=checkpoints, settings=_settings(cfg, steps_per_epoch, fpt),
                      state_extra=state_extra, log=print)
    # Resume (and its checks) before writing anything: a refused resume leaves the run as it was.
    resumed_from = trainer.resume(t.resume)
    if resumed_from is not None:
        _check_resume(trainer, train_sft, identity)
    elif t.resume not in ("auto", "none"):
        raise UserError(f"train.resume: could not resume from {t.resume}")

    run = prepare_run_dir(cfg, resumed_from is not None)
    tokenizer.save(run / "tokenizer")  # generate/chat/eval find it beside the checkpoints
    info = _run_info(cfg, init_path, identity, fpt, precision, threads, conversations,
                     len(train_examples), len(val_examples))
    (run / "run_info.json").write_text(json.dumps(info, indent=2, default=str) + "\n",
                                       encoding="utf-8")
    metrics = MetricsWriter(run / "logs", resume_step=trainer.global_step if resumed_from else None,
                            tensorboard=cfg.log.tensorboard, fresh=resumed_from is None)
    trainer.metrics, trainer.log = metrics, metrics.log_line
    if t.compile == "true" or (t.compile == "auto" and precision.device.type == "cuda"):
        trainer.train_model = torch.compile(model)
    trainer.dashboard = (LiveDashboard(run, cfg.log.plot_every, cfg.log.keep_plot_iterations)
                         if cfg.log.plot_every else None)
    log = metrics.log_line
    trainer.sampler = _sampler(run, tokenizer, t.sample_prompts, t.sample_tokens,
                               t.sample_temperature, t.seed, log)
    unknown = unknown_fraction(train_examples[:2000], tokenizer)
    _log_start(log, cfg, info, conversations, precision, threads, extended, trainer, unknown)
    if resumed_from is not None:
        log(f"resumed from {resumed_from} at step {trainer.global_step}")
    try:
        train_and_finish(trainer, run, None, log)
    finally:
        metrics.close()
    return 0


def _run_info(cfg: Config, init_path: Path, identity: dict[str, Any], fpt: int, precision,
              threads: int, conversations, n_train: int, n_val: int) -> dict[str, Any]:
    """run_info.json: phase 1's record plus what only instruction tuning has."""
    info = run_info(cfg, {"tokenizer": identity}, precision, threads, Dist(), phase=PHASE)
    info["train"]["max_epochs"] = cfg.sft.max_epochs
    return {**info, "flops_per_token": fpt, "init_from": str(init_path), "data": cfg.sft.data,
            "weights": cfg.sft.weights, "pack": cfg.sft.pack,
            "sources": [src.__dict__ for src in conversations.sources],
            "examples": {"train": n_train, "val": n_val, "skipped": conversations.skipped}}


def _log_start(log, cfg: Config, info: dict[str, Any], conversations, precision, threads: int,
               extended: bool, trainer: Trainer, unknown: float) -> None:
    m = cfg.model
    log(f"lmforge {__version__} sft | {precision.describe()} | threads {threads}")
    log(f"init from {info['init_from']}: {info['params']:,} parameters ({m.block}, "
        f"{m.n_layers}x{m.dim}, {m.n_heads} heads" + (f", canon {m.canon}" if m.canon else "")
        + f", context {m.context}, vocab {m.vocab_size} padded to "
        f"{m.padded_vocab}{', extended for the chat tokens' if extended else ''})")
    for src in conversations.sources:
        log(f"data {src.path} ({src.format}): {src.records:,} conversations, weight {src.weight:g}"
            f", used {src.used:,}" + (f", skipped {src.skipped}" if src.skipped else ""))
    ex = info["examples"]
    layout = "packed" if cfg.sft.pack else "padded"
    per_epoch = trainer.train_data.batches_per_epoch
    log(f"examples: {ex['train']:,} train / {ex['val']:,} val ({layout}, {per_epoch:,} "
        "batches per epoch); "
        f"{trainer._max_steps:,} steps, eval every {trainer.settings.eval_every}")
    if unknown > 0.01:
        log(f"warning: {100 * unknown:.1f}% of the training ids are the tokenizer's unknown id: "
            "the data uses characters the checkpoint's vocabulary lacks")
    if cfg.schedule.warmup_steps >= trainer._max_steps:
        log(f"warning: schedule.warmup_steps ({cfg.schedule.warmup_steps}) >= the run's "
            f"{trainer._max_steps} steps: the learning rate never reaches optim.lr")
