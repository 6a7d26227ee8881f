"""Typed configuration: dataclasses with a help line per field, presets, YAML, --key=value.

Configs are data, never code: YAML is read with `yaml.safe_load`, command-line overrides are parsed
as YAML scalars, and every value is checked against its field's type before any work starts.
Resolution order: field defaults < model preset < YAML file < command-line overrides.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmforge.chat_format import N_CHAT_TOKENS
from lmforge.errors import UserError


def opt(default: Any, help: str, choices: tuple | None = None) -> Any:
    """A dataclass field with a help line (shown by `--help`) and optional allowed values."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help, "choices": choices})


def padded_vocab_size(vocab_size: int, multiple: int = 64) -> int:
    """Vocabulary rows in the model: room for the chat tokens, rounded up for fast matmuls.

    50,257 (GPT-2) -> 50,304, as nanoGPT pads it. multiple <= 1 disables padding entirely (the
    chat tokens are then added by resizing when instruction tuning starts).
    """
    if multiple <= 1:
        return vocab_size
    return math.ceil((vocab_size + N_CHAT_TOKENS) / multiple) * multiple


@dataclass
class ModelConfig:
    preset: str = opt("tiny", "named preset the other model fields default to (see model-info)")
    block: str = opt(
        "llama", "block type: llama (RMSNorm, RoPE, SwiGLU) or gpt2", ("llama", "gpt2")
    )
    n_layers: int = opt(4, "number of transformer blocks")
    dim: int = opt(128, "model width (embedding size)")
    n_heads: int = opt(4, "attention heads")
    n_kv_heads: int = opt(0, "key/value heads for grouped-query attention (0 = n_heads)")
    ffn_hidden: int = opt(0, "feed-forward hidden size (0 = 4 * dim)")
    context: int = opt(256, "context length in tokens (training window)")
    max_context: int = opt(1024, "largest context this preset supports")
    vocab_size: int = opt(50257, "vocabulary size (set from the prepared data when training)")
    pad_vocab_multiple: int = opt(64, "pad the vocabulary to a multiple of this (<=1: no padding)")
    tie_embeddings: bool = opt(True, "share the token embedding with the LM head")
    qk_norm: bool = opt(False, "RMS-normalise queries and keys per head (llama block)")
    bias: bool = opt(
        True,
        "biases in the gpt2 block's linear layers and LayerNorms (GPT-2 has them, nanoGPT's "
        "default model does not; exports write zeros for them); the llama block has none",
    )
    gelu: str = opt(
        "tanh",
        "the gpt2 block's GELU: tanh (GPT-2's approximation) or exact (erf, nanoGPT's "
        "nn.GELU; not exportable to GGUF, whose gpt2 architecture computes the tanh form)",
        ("tanh", "exact"),
    )
    canon: int = opt(
        0,
        "width of a causal depthwise convolution on each block's attention input, a 'canon "
        "layer' that can help a small model look words up in its context (0 = off; not "
        "exportable to Hugging Face or GGUF)",
    )
    dropout: float = opt(0.0, "dropout on attention and residual paths")
    rope_theta: float = opt(10000.0, "RoPE base frequency (llama block)")
    norm_eps: float = opt(1e-5, "epsilon of RMSNorm / LayerNorm")
    init_std: float = opt(
        0.02, "std of the normal init; residual projections use std/sqrt(2*layers)"
    )

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hidden(self) -> int:
        return self.ffn_hidden or 4 * self.dim

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def padded_vocab(self) -> int:
        return padded_vocab_size(self.vocab_size, self.pad_vocab_multiple)


# One table of named model shapes. Counts (unpadded vocab 50,257) are asserted by the tests.
PRESETS: dict[str, dict[str, Any]] = {
    # CPU demo model: ~1-3 M parameters with a char/byte/bpe vocabulary.
    "tiny": dict(block="llama", n_layers=4, dim=128, n_heads=4, context=256, max_context=1024),
    # The seed run of 000_...: 59,294,720 parameters, Llama/DeepSeek style, tied head.
    "seed-59m": dict(
        block="llama",
        n_layers=8,
        dim=512,
        n_heads=8,
        ffn_hidden=2048,
        context=1024,
        max_context=1024,
    ),
    # The CPU two-phase model (002/003): 23,562,560 parameters, GPT-2 block.
    "trm-23m": dict(
        block="gpt2", n_layers=6, dim=320, n_heads=5, ffn_hidden=1280, context=256, max_context=256
    ),
    # The same project's model before it was shrunk: 51,082,752 parameters.
    "trm-51m": dict(
        block="gpt2", n_layers=8, dim=512, n_heads=8, ffn_hidden=2048, context=256, max_context=256
    ),
    # GPT-2 small: 124,439,808 parameters.
    "gpt2-124m": dict(
        block="gpt2",
        n_layers=12,
        dim=768,
        n_heads=12,
        ffn_hidden=3072,
        context=1024,
        max_context=1024,
    ),
}


@dataclass
class DataConfig:
    dir: str = opt(
        "", "prepared data folder (train.bin, val.bin, meta.json from `lmforge prepare`)"
    )
    mode: str = opt(
        "random",
        "batches: random windows; epoch (non-overlapping, shuffled); or doc (random windows that "
        "start where a document starts, validation scoring whole documents)",
        ("random", "epoch", "doc"),
    )
    stride: int = opt(0, "epoch mode: window stride in tokens (0 = context)")
    allow_instruction_data: bool = opt(False, "let phase 1 train on instruction-format data")


@dataclass
class TrainConfig:
    max_steps: int = opt(1000, "optimizer steps to run (0 = until max_epochs)")
    max_epochs: int = opt(0, "stop after this many passes over the data (0 = no limit)")
    batch_size: int = opt(16, "sequences per micro-batch")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    seed: int = opt(1337, "seed for init, batches and sampling")
    device: str = opt("auto", "auto (cuda -> mps -> cpu), cuda, cuda:N, mps or cpu")
    dtype: str = opt(
        "auto",
        "auto, fp32, bf16 or fp16 (fp16 uses a gradient scaler)",
        ("auto", "fp32", "bf16", "fp16"),
    )
    compile: str = opt(
        "auto",
        "torch.compile the model: auto (on for CUDA), true, false (true on a CPU: C++ kernels "
        "built in the first steps, 14-24 s, cached for later runs, then up to 1.25x a step; "
        "needs g++ or clang++)",
        ("auto", "true", "false"),
    )
    threads: int = opt(0, "CPU threads (0 = physical cores)")
    max_grad_norm: float = opt(1.0, "clip the gradient norm to this (0 = no clipping)")
    max_skipped_steps: int = opt(
        10,
        "stop after this many steps in a row whose gradient norm is not finite (each such "
        "update is skipped, never applied or saved)",
    )
    save_every: int = opt(500, "checkpoint every N steps (0 = only at the end)")
    save_every_minutes: float = opt(10.0, "also checkpoint when this many minutes passed (0 = off)")
    keep_last: int = opt(5, "step checkpoints to keep (best.pt and final_model.pt are extra)")
    eval_every: int = opt(250, "validation every N steps (0 = only at the end)")
    eval_batches: int = opt(20, "fixed validation batches per evaluation")
    patience: int = opt(
        0,
        "early stopping: evaluations without improvement (0 = off; with a wsd schedule only "
        "those of its decay count)",
    )
    min_delta: float = opt(0.001, "early stopping: smallest val-loss drop that counts")
    sample_every: int = opt(500, "generate samples every N steps (0 = off)")
    sample_prompts: list = opt(
        ["Once upon a time", "The future of", "In a world where"],
        "prompts for the periodic samples",
    )
    sample_tokens: int = opt(60, "new tokens per sample")
    sample_temperature: float = opt(0.9, "sampling temperature of the periodic samples")
    resume: str = opt(
        "auto", "auto (newest valid checkpoint in run.dir), none, or a checkpoint path"
    )
    warmup_passes: int = opt(3, "untimed forward/backward passes before timing starts")
    activation_checkpointing: bool = opt(False, "recompute block activations in backward")
    distributed: str = opt(
        "ddp", "under torchrun: ddp, or fsdp (FSDP2 fully_shard)", ("ddp", "fsdp")
    )
    init_from: str = opt("", "start from these weights (checkpoint, run folder or HF folder)")


@dataclass
class OptimConfig:
    name: str = opt(
        "adamw",
        "optimizer: adamw, or muon (Muon for 2-D weights, AdamW for the rest)",
        ("adamw", "muon"),
    )
    lr: float = opt(3e-4, "peak learning rate")
    min_lr: float = opt(3e-5, "final learning rate of the cosine / decay phase")
    weight_decay: float = opt(0.1, "AdamW weight decay, on matrices only")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    eps: float = opt(1e-8, "AdamW epsilon")
    muon_lr: float = opt(0.02, "Muon learning rate for the 2-D hidden weights")
    muon_momentum: float = opt(0.95, "Muon momentum")


@dataclass
class ScheduleConfig:
    kind: str = opt(
        "cosine",
        "cosine (warmup + cosine), constant, or wsd (warmup-stable-decay)",
        ("cosine", "constant", "wsd"),
    )
    warmup_steps: int = opt(500, "linear warmup steps")
    decay_steps: int = opt(0, "cosine: steps to reach min_lr (0 = max_steps)")
    wsd_decay_fraction: float = opt(0.2, "wsd: fraction of max_steps spent decaying at the end")


@dataclass
class LogConfig:
    log_every: int = opt(10, "one log line and CSV row every N steps")
    plot_every: int = opt(500, "refresh the dashboard PNG every N steps (0 = only at the end)")
    keep_plot_iterations: bool = opt(False, "also keep iter_N_dashboard.png at each refresh")
    tensorboard: bool = opt(False, "write TensorBoard scalars (pip install lmforge[tensorboard])")
    progress: str = opt(
        "auto", "progress bar: auto (when interactive), true, false", ("auto", "true", "false")
    )
    peak_tflops: float = opt(0.0, "device peak TFLOP/s for MFU (0 = from the known-device table)")


@dataclass
class RunConfig:
    dir: str = opt("runs/default", "run folder: config.yaml, logs/, checkpoints/, training_plots/")


@dataclass
class SFTConfig:
    data: str = opt("", "files/folders, comma-separated, FORMAT:PATH to force a format")
    weights: str = opt("", "mixture weights, comma-separated, one per source")
    val_fraction: float = opt(0.05, "fraction of conversations held out for validation")
    patience: int = opt(
        2, "early stopping: evaluations without improvement (wsd: only those of its decay count)"
    )
    min_delta: float = opt(0.001, "early stopping: smallest val-loss drop that counts")
    max_epochs: int = opt(2, "passes over the instruction data")
    pack: bool = opt(False, "pack several examples per row (no cross-example attention)")
    questions_per_story: int = opt(
        1, "stories-qa: questions about one story asked in one conversation (follow-up turns)"
    )
    skip_bad: bool = opt(False, "skip malformed records (and count them) instead of stopping")
    allow_plain_text: bool = opt(False, "let phase 2 train on plain-text data")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    log: LogConfig = field(default_factory=LogConfig)
    run: RunConfig = field(default_factory=RunConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)}


def model_config(preset_or_path: str, **overrides: Any) -> ModelConfig:
    """ModelConfig from a preset name or a YAML config file (its `model:` section)."""
    if preset_or_path in PRESETS:
        raw: dict[str, Any] = {"preset": preset_or_path}
    elif preset_or_path.endswith((".yaml", ".yml")) or Path(preset_or_path).exists():
        section = read_yaml(preset_or_path).get("model") or {}
        if not isinstance(section, dict):
            raise UserError(f"config section 'model' in {preset_or_path} must be a mapping of keys")
        raw = dict(section)
    else:
        raise UserError(
            f"unknown preset or config '{preset_or_path}': use one of "
            f"{', '.join(PRESETS)} or a YAML file"
        )
    raw.update(overrides)
    cfg = _build_model(raw)
    validate_model(cfg)
    return cfg


def model_config_from_dict(values: dict[str, Any]) -> ModelConfig:
    """A ModelConfig from saved values (a checkpoint's or an export's), checked like any config."""
    cfg = _build_section(ModelConfig, values, "model")
    validate_model(cfg)
    return cfg


def _build_model(raw: dict[str, Any]) -> ModelConfig:
    preset = raw.get("preset", ModelConfig.preset)
    if preset not in PRESETS:
        raise UserError(
            f"model.preset: unknown preset '{preset}' (choose from {', '.join(PRESETS)})"
        )
    merged = {**PRESETS[preset], **raw}
    return _build_section(ModelConfig, merged, "model")


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise UserError(f"config file {path} is a folder: name a YAML file")
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise UserError(f"malformed YAML in {path}{line}: fix the syntax") from None
    except UnicodeDecodeError:
        raise UserError(f"config file {path} is not UTF-8 text") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of sections (model:, train:, ...)")
    return data


def parse_overrides(args: list[str]) -> dict[str, dict[str, Any]]:
    """`--train.batch_size=8` / `--optim.lr 3e-4` overrides -> nested dict (values read as YAML)."""
    out: dict[str, dict[str, Any]] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument '{arg}': overrides look like --section.key=value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise UserError(f"override --{key} has no value: write --{key}=VALUE")
            value = args[i + 1]
            i += 1
        section, dot, name = key.partition(".")
        if not dot:
            section, name = _section_of(key), key
        out.setdefault(section, {})[name] = _parse_scalar(value)
        i += 1
    return out


def _section_of(key: str) -> str:
    """Undotted keys (nanoGPT style, `--lr=1e-3`) are looked up in the sections; must be unique."""
    homes = [s for s, cls in SECTIONS.items() if key in {f.name for f in dataclasses.fields(cls)}]
    if len(homes) != 1:
        hint = f"it is in {', '.join(homes)}" if homes else "no section has it"
        raise UserError(f"unknown or ambiguous key '{key}' ({hint}): use --section.{key}=VALUE")
    return homes[0]


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def load_config(
    path: str | None = None, overrides: list[str] | None = None, base: dict[str, Any] | None = None
) -> Config:
    """The resolved, validated config: defaults < preset < base < YAML file < overrides."""
    raw: dict[str, dict[str, Any]] = {}
    for layer in (base or {}, read_yaml(path) if path else {}, parse_overrides(overrides or [])):
        for section, values in layer.items():
            if section not in SECTIONS:
                raise UserError(
                    f"unknown config section '{section}' (sections: {', '.join(SECTIONS)})"
                )
            if not isinstance(values, dict):
                raise UserError(f"config section '{section}' must be a mapping of keys")
            raw.setdefault(section, {}).update(values)
    cfg = Config(
        model=_build_model(raw.get("model", {})),
        **{s: _build_section(SECTIONS[s], raw.get(s, {}), s) for s in SECTIONS if s != "model"},
    )
    validate(cfg)
    return cfg


def _build_section(cls: type, values: dict[str, Any], section: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise UserError(f"unknown config key '{section}.{key}': see `lmforge train --help`")
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}")
        choices = known[key].metadata.get("choices")
        if choices and kwargs[key] not in choices:
            raise UserError(f"{section}.{key}: '{kwargs[key]}' is not one of {', '.join(choices)}")
    return cls(**kwargs)


def _coerce(value: Any, kind: Any, key: str) -> Any:
    """Check a value against its field type (YAML 1.1 reads `3e-4` as a string: a number here)."""

    def wrong() -> UserError:
        name = getattr(kind, "__name__", str(kind))
        return UserError(f"{key}: expected {name}, got {value!r}")

    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise wrong()
    if kind is int:
        if isinstance(value, bool):
            raise wrong()
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                raise wrong() from None
            if number.is_integer():
                return int(number)
        raise wrong()
    if kind is float:
        if isinstance(value, bool):
            raise wrong()
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise wrong() from None
        raise wrong()
    if kind is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):  # `compile: true` in YAML
            return "true" if value else "false"
        if isinstance(value, int | float):
            return str(value)
        raise wrong()
    if kind is list:
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(
            isinstance(v, str | int | float) and not isinstance(v, bool) for v in value
        ):
            return [str(v) for v in value]
        raise wrong()
    return value


# Where a value has one valid range, it is stated here once, as the error message words it.
_NOT_NEGATIVE = ">= 0"
_POSITIVE = "positive"
_UNIT = "in [0, 1)"
DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
MAX_SEED = 2**62


def validate_model(m: ModelConfig) -> None:
    """The model section's impossible values (also checked for a checkpoint's saved config)."""
    _finite(m, "model")
    _ranges(
        m,
        "model",
        {
            "n_layers": (m.n_layers > 0, _POSITIVE),
            "dim": (m.dim > 0, _POSITIVE),
            "n_heads": (m.n_heads > 0, _POSITIVE),
            "n_kv_heads": (m.n_kv_heads >= 0, ">= 0 (0 = model.n_heads)"),
            "ffn_hidden": (m.ffn_hidden >= 0, ">= 0 (0 = 4 * model.dim)"),
            "context": (m.context > 0, _POSITIVE),
            "max_context": (m.max_context > 0, _POSITIVE),
            "vocab_size": (m.vocab_size > 0, _POSITIVE),
            "pad_vocab_multiple": (m.pad_vocab_multiple >= 0, ">= 0 (0 or 1 = no padding)"),
            "canon": (0 <= m.canon <= 16, "0 (off) to 16"),
            "dropout": (0.0 <= m.dropout < 1.0, _UNIT),
            "rope_theta": (m.rope_theta > 0, _POSITIVE),
            "norm_eps": (m.norm_eps > 0, _POSITIVE),
            "init_std": (m.init_std > 0, _POSITIVE),
        },
    )
    _need(
        m.dim % m.n_heads == 0,
        f"model.dim ({m.dim}) must be divisible by model.n_heads ({m.n_heads})",
    )
    _need(
        m.n_heads % m.kv_heads == 0,
        f"model.n_kv_heads ({m.n_kv_heads}) must divide model.n_heads ({m.n_heads})",
    )
    _need(
        m.block == "gpt2" or m.head_dim % 2 == 0,
        f"model.dim / model.n_heads must be even for RoPE (got {m.head_dim})",
    )
    _need(
        m.context <= m.max_context,
        f"model.context ({m.context}) is above the preset's maximum ({m.max_context}): "
        f"lower it or raise model.max_context",
    )


def validate(cfg: Config) -> None:
    """Impossible values fail before any work, naming the key and the value: every float must
    be finite, every number in its range, every string of the form its key reads."""
    validate_model(cfg.model)
    for section in SECTIONS:
        if section != "model":
            _finite(getattr(cfg, section), section)
    d, t, o, s, log, sft = cfg.data, cfg.train, cfg.optim, cfg.schedule, cfg.log, cfg.sft
    _ranges(d, "data", {"stride": (d.stride >= 0, ">= 0 (0 = model.context)")})
    _ranges(
        t,
        "train",
        {
            "max_steps": (t.max_steps >= 0, ">= 0 (0 = until train.max_epochs)"),
            "max_epochs": (t.max_epochs >= 0, ">= 0 (0 = no limit)"),
            "batch_size": (t.batch_size > 0, _POSITIVE),
            "grad_accum": (t.grad_accum > 0, _POSITIVE),
            "seed": (0 <= t.seed <= MAX_SEED, "a whole number from 0 to 2**62"),
            "device": (bool(DEVICE.match(t.device)), "auto, cpu, cuda, cuda:N or mps"),
            "threads": (t.threads >= 0, ">= 0 (0 = physical cores)"),
            "max_grad_norm": (t.max_grad_norm >= 0, ">= 0 (0 = no clipping)"),
            "max_skipped_steps": (t.max_skipped_steps >= 1, "at least 1"),
            "save_every": (t.save_every >= 0, ">= 0 (0 = only at the end)"),
            "save_every_minutes": (t.save_every_minutes >= 0, ">= 0 (0 = off)"),
            "keep_last": (t.keep_last >= 1, "at least 1"),
            "eval_every": (t.eval_every >= 0, ">= 0 (0 = only at the end)"),
            "eval_batches": (t.eval_batches > 0, _POSITIVE),
            "patience": (t.patience >= 0, ">= 0 (0 = off)"),
            "min_delta": (t.min_delta >= 0, _NOT_NEGATIVE),
            "sample_every": (t.sample_every >= 0, ">= 0 (0 = off)"),
            "sample_tokens": (t.sample_tokens > 0, _POSITIVE),
            "sample_temperature": (t.sample_temperature >= 0, ">= 0 (0 = greedy)"),
            "resume": (bool(t.resume.strip()), "auto, none or a checkpoint path"),
            "warmup_passes": (t.warmup_passes >= 0, _NOT_NEGATIVE),
        },
    )
    _need(t.max_steps > 0 or t.max_epochs > 0, "set train.max_steps or train.max_epochs above 0")
    _ranges(
        o,
        "optim",
        {
            "lr": (o.lr > 0, _POSITIVE),
            "min_lr": (0 <= o.min_lr <= o.lr, f"in [0, optim.lr = {o.lr}]"),
            "weight_decay": (o.weight_decay >= 0, _NOT_NEGATIVE),
            "beta1": (0 <= o.beta1 < 1, _UNIT),
            "beta2": (0 <= o.beta2 < 1, _UNIT),
            "eps": (o.eps > 0, _POSITIVE),
            "muon_lr": (o.muon_lr > 0, _POSITIVE),
            "muon_momentum": (0 <= o.muon_momentum < 1, _UNIT),
        },
    )
    _ranges(
        s,
        "schedule",
        {
            "warmup_steps": (s.warmup_steps >= 0, _NOT_NEGATIVE),
            "decay_steps": (s.decay_steps >= 0, ">= 0 (0 = train.max_steps)"),
            "wsd_decay_fraction": (0 < s.wsd_decay_fraction <= 1, "in (0, 1]"),
        },
    )
    _ranges(
        log,
        "log",
        {
            "log_every": (log.log_every > 0, _POSITIVE),
            "plot_every": (log.plot_every >= 0, ">= 0 (0 = only at the end)"),
            "peak_tflops": (log.peak_tflops >= 0, ">= 0 (0 = from the known-device table)"),
        },
    )
    _need(bool(cfg.run.dir.strip()), "run.dir is empty: name the run folder, e.g. --run.dir=runs/x")
    _ranges(
        sft,
        "sft",
        {
            "val_fraction": (0 < sft.val_fraction < 1, "in (0, 1)"),
            "patience": (sft.patience >= 0, ">= 0 (0 = off)"),
            "min_delta": (sft.min_delta >= 0, _NOT_NEGATIVE),
            "max_epochs": (sft.max_epochs > 0, _POSITIVE),
            "questions_per_story": (sft.questions_per_story > 0, _POSITIVE),
        },
    )
    _check_sources(sft)


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def _finite(section: Any, name: str) -> None:
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{name}.{f.name} must be a finite number; got {value}")


def _ranges(section: Any, name: str, checks: dict[str, tuple[bool, str]]) -> None:
    for key, (ok, requirement) in checks.items():
        if not ok:
            value = getattr(section, key)
            raise UserError(f"{name}.{key} must be {requirement}; got {value!r}")


def _check_sources(sft: SFTConfig) -> None:
    """sft.data: no entry without a path (`squad:` alone would read the current folder);
    sft.weights: one finite number >= 0 per sft.data source, not all zero."""
    for item in sft.data.split(","):
        prefix, colon, path = item.strip().partition(":")
        if colon and prefix and not path.strip():
            raise UserError(f"sft.data: {item.strip()!r} names no file or folder after the ':'")
    if not sft.weights.strip():
        return
    items = [w.strip() for w in sft.weights.split(",")]
    try:
        values = [float(w) for w in items]
    except ValueError:
        raise UserError(
            f"sft.weights must be comma-separated numbers, one per sft.data source, e.g. 1,0.5 "
            f"(got {sft.weights!r})"
        ) from None
    if any(not math.isfinite(w) or w < 0 for w in values) or not any(values):
        raise UserError(f"sft.weights must be finite, >= 0 and not all 0 (got {sft.weights!r})")
    sources = [item for item in sft.data.split(",") if item.strip()]
    if sources and len(sources) != len(values):
        raise UserError(
            f"sft.weights has {len(values)} weights for {len(sources)} sft.data sources "
            f"(got {sft.weights!r}): give one weight per comma-separated source"
        )


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically: a reader never sees half a file)."""
    from lmforge.files import write_atomic

    write_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def config_help() -> str:
    """Every key with its default and help line, for `lmforge train --help`."""
    lines = []
    for section, cls in SECTIONS.items():
        lines.append(f"{section}:")
        defaults = cls()
        for f in dataclasses.fields(cls):
            value = getattr(defaults, f.name)
            shown = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...")
            lines.append(f"  --{section}.{f.name}={shown}".ljust(44) + f"  {f.metadata['help']}")
    return "\n".join(lines)
