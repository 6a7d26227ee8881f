"""Read training metrics from lmforge runs and other trainers' logs into one table.

The format is detected from the content, not the file name:
* `lmforge-run`     a run folder: logs/training_metrics.csv + run_info.json + config.yaml
* `lmforge-csv`, `lmforge-jsonl`   a run's metrics files on their own
* `nanogpt-stdout`  nanoGPT's printed log: `iter N: loss X, time Yms, mfu Z%` and
                    `step N: train loss X, val loss Y`
* `csv`, `jsonl`    any table with a step column (step / iter / iteration / global_step)
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmforge.errors import UserError
from lmforge.monitor.metrics import COLUMNS, CSV_NAME, JSONL_NAME

NAN = float("nan")
# Per-step columns; each is either empty (not in this log) or as long as `step` (NaN = no value).
SERIES = (
    "loss",
    "lr",
    "grad_norm",
    "ms_per_step",
    "tokens_per_s",
    "mfu",
    "memory_mb",
    "tokens_seen",
    "elapsed_s",
)
STEP_KEYS = ("step", "iter", "iteration", "global_step")
# Other trainers' names for our columns (lower-cased); first match wins.
ALIASES = {
    "loss": ("loss", "train_loss", "train/loss"),
    "val_loss": ("val_loss", "valid_loss", "validation_loss", "eval_loss", "val/loss", "eval/loss"),
    "lr": ("lr", "learning_rate", "train/lr"),
    "grad_norm": ("grad_norm", "gradient_norm", "train/grad_norm"),
    "ms_per_step": ("ms_per_step", "time_ms", "iter_time_ms", "step_time_ms", "dt_ms"),
    "tokens_per_s": ("tokens_per_s", "tok_per_s", "tokens_per_sec", "throughput"),
    "mfu": ("mfu", "mfu_percent", "mfu_pct"),
    "memory_mb": ("memory_mb", "mem_mb"),
    "tokens_seen": ("tokens_seen", "tokens", "num_tokens"),
    "elapsed_s": ("elapsed_s", "elapsed", "wall_time", "time_s"),
}
FLOAT = r"([-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan|inf))"
NANOGPT_ITER = re.compile(rf"\biter (\d+): loss {FLOAT}, time {FLOAT}ms(?:, mfu {FLOAT}%)?")
NANOGPT_EVAL = re.compile(rf"\bstep (\d+): train loss {FLOAT}, val loss {FLOAT}")
NANOGPT_CONFIG = re.compile(
    r"^(?:Overriding: )?(n_layer|n_head|n_embd|block_size|batch_size|learning_rate|min_lr|"
    r"max_iters|gradient_accumulation_steps)\s*=\s*([-+\d.eE]+)\s*(?:#.*)?$"
)


@dataclass
class MetricsTable:
    """One run's metrics, whatever wrote them. `info` holds run_info.json (+ `config`) if known."""

    format: str
    source: str
    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    ms_per_step: list[float] = field(default_factory=list)
    tokens_per_s: list[float] = field(default_factory=list)
    mfu: list[float] = field(default_factory=list)  # a fraction (0.41), like lmforge's CSV
    memory_mb: list[float] = field(default_factory=list)
    tokens_seen: list[float] = field(default_factory=list)
    elapsed_s: list[float] = field(default_factory=list)
    val_step: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def has(self, column: str) -> bool:
        return any(math.isfinite(v) for v in getattr(self, column))

    def points(self, column: str) -> tuple[list[float], list[float]]:
        """(steps, values) of the finite values of one column."""
        xs = self.val_step if column == "val_loss" else self.step
        pairs = [(x, v) for x, v in zip(xs, getattr(self, column)) if math.isfinite(v)]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    @property
    def name(self) -> str:
        """The run folder's name, else the log file's."""
        return Path(self.info.get("run_dir") or self.source).name

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe columns (NaN -> None)."""
        cols = ("step", *SERIES, "val_step", "val_loss")
        return {c: [v if math.isfinite(v) else None for v in getattr(self, c)] for c in cols}


def _num(value: Any) -> float:
    if isinstance(value, bool) or value is None:
        return NAN
    try:
        return float(str(value).strip().rstrip("%").replace(",", "")) if value != "" else NAN
    except ValueError:
        return NAN


def load_metrics(path: str | Path) -> MetricsTable:
    """Read a run folder or a log file (format detected from its content)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder (pass a run folder or a metrics log)")
    if path.is_dir():
        for candidate in (path / "logs" / CSV_NAME, path / "logs" / JSONL_NAME, path / CSV_NAME):
            if candidate.is_file():
                table = _load_file(candidate)
                table.format, table.source = "lmforge-run", str(path)
                table.info.setdefault("run_dir", str(path))
                return table
        raise UserError(f"{path} is a folder without logs/{CSV_NAME}: is it an lmforge run folder?")
    return _load_file(path)


def _load_file(path: Path) -> MetricsTable:
    data = path.read_bytes()
    if not data.strip():
        raise UserError(f"{path} is empty: no metrics logged yet")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = "\0"
    if "\0" in text[:8192]:
        raise UserError(f"{path} looks binary, not a text log: pass a CSV, JSONL or stdout log")
    lines = [line for line in text.splitlines() if line.strip()]
    run_dir = path.parent.parent if path.parent.name == "logs" else path.parent
    in_run = (run_dir / "run_info.json").exists() or (run_dir / "config.yaml").exists()
    info = _run_info(run_dir) if in_run else {}
    if lines[0].lstrip().startswith("{"):
        rows = []
        for line in lines:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a torn last line from a killed run
        table = _from_rows([r for r in rows if isinstance(r, dict)], "jsonl", path)
    elif any(NANOGPT_ITER.search(line) or NANOGPT_EVAL.search(line) for line in lines):
        table = _from_nanogpt(lines, path)
    else:
        table = _from_csv(lines, path)
    table.info = {**info, **table.info}
    _derive(table)
    return table


def _from_csv(lines: list[str], path: Path) -> MetricsTable:
    delimiter = max(",\t;", key=lines[0].count)
    rows = list(csv.reader(lines, delimiter=delimiter))
    header = [h.strip() for h in rows[0]]
    looks_tabular = (
        len(header) >= 2
        and all(re.fullmatch(r"[\w/ .%()-]+", h) for h in header)
        and any(len(r) == len(header) for r in rows[1:])
    )
    if not looks_tabular:
        raise UserError(
            f"{path}: no recognizable metrics (expected an lmforge run, nanoGPT's stdout "
            "`iter N: loss X, ...`, or a CSV/JSONL with a step column)"
        )
    return _from_rows([dict(zip(header, r)) for r in rows[1:]], "csv", path)


def _from_rows(rows: list[dict[str, Any]], fmt: str, path: Path) -> MetricsTable:
    keys = {k.lower().strip(): k for row in rows[:50] for k in row}
    step_key = next((keys[k] for k in STEP_KEYS if k in keys), None)
    if step_key is None:
        raise UserError(
            f"{path}: {fmt.upper()} without a step column (has: {', '.join(list(keys)[:12])}); "
            f"add one named {' / '.join(STEP_KEYS)}"
        )
    found = {col: keys[a] for col, names in ALIASES.items() if (a := _first(names, keys))}
    if "time" in keys and "ms_per_step" not in found and "elapsed_s" not in found:
        times = [_num(r.get(keys["time"])) for r in rows]
        times = [t for t in times if math.isfinite(t)]
        # A rising "time" is a clock (seconds); one that goes up and down is a per-step duration.
        rising = all(b >= a for a, b in zip(times, times[1:]))
        found["elapsed_s" if rising else "ms_per_step"] = keys["time"]
    is_lmforge = set(COLUMNS) <= set(keys)
    table = MetricsTable(f"lmforge-{fmt}" if is_lmforge else fmt, str(path))
    train_cols = [c for c in SERIES if c in found]
    for row in rows:
        step = _num(row.get(step_key))
        if not math.isfinite(step):
            continue
        values = {c: _num(row.get(found[c])) for c in train_cols}
        if any(row.get(found[c]) not in (None, "") for c in train_cols):  # nan counts
            table.step.append(int(step))
            for c in train_cols:
                getattr(table, c).append(values[c])
        if "val_loss" in found and math.isfinite(val := _num(row.get(found["val_loss"]))):
            table.val_step.append(int(step))
            table.val_loss.append(val)
        for column in ("loss", "val_loss"):
            if column in found:
                _note_non_finite(table, column, int(step), row.get(found[column]))
    if not table.step and not table.val_step:
        raise UserError(f"{path}: has a step column but no metric values (loss, lr, time, ...)")
    if table.mfu and not is_lmforge and max((v for v in table.mfu if v == v), default=0) > 1.5:
        table.mfu = [v / 100 for v in table.mfu]  # written as percent
    return table


def _note_non_finite(table: MetricsTable, column: str, step: int, raw: Any) -> None:
    """Remember the first nan/inf loss: an empty cell and a diverged one both read as NaN."""
    if str(raw).strip().lower() in ("nan", "inf", "-inf", "+inf", "infinity"):
        table.info.setdefault("non_finite", f"{column} became {str(raw).strip()} at step {step}")


def _first(names: tuple[str, ...], keys: dict[str, str]) -> str | None:
    return next((name for name in names if name in keys), None)


def _from_nanogpt(lines: list[str], path: Path) -> MetricsTable:
    table = MetricsTable("nanogpt-stdout", str(path))
    table.loss, table.ms_per_step, table.mfu = [], [], []
    config: dict[str, float] = {}
    eval_train: list[float] = []
    for line in lines:
        if m := NANOGPT_ITER.search(line):
            _note_non_finite(table, "loss", int(m[1]), m[2])
            table.step.append(int(m[1]))
            table.loss.append(_num(m[2]))
            table.ms_per_step.append(_num(m[3]))
            mfu = _num(m[4]) if m[4] else NAN
            table.mfu.append(mfu / 100 if mfu >= 0 else NAN)  # -100% = not measured yet
        elif m := NANOGPT_EVAL.search(line):
            _note_non_finite(table, "val_loss", int(m[1]), m[3])
            table.val_step.append(int(m[1]))
            eval_train.append(_num(m[2]))
            table.val_loss.append(_num(m[3]))
        elif m := NANOGPT_CONFIG.match(line.strip()):
            config[m[1]] = _num(m[2])
        elif m := re.search(r"number of parameters: ([\d.]+)M", line):
            config["params"] = _num(m[1]) * 1e6
        elif m := re.search(r"vocab_size (?:= |of GPT-2 to )(\d+)", line):
            config["vocab_size"] = _num(m[1])
        elif m := re.search(r"tokens per iteration will be: ([\d,]+)", line):
            config["tokens_per_step"] = _num(m[1])
    if not table.step:  # only eval lines: their train loss is the training curve we have
        table.step, table.loss = list(table.val_step), eval_train
        table.ms_per_step, table.mfu = [], []
    table.info |= _nanogpt_info(config)
    tokens_per_step = config.get("tokens_per_step")
    if tokens_per_step and table.ms_per_step:
        # nanoGPT prints `iter N` after the step, so N + 1 steps are done.
        table.tokens_seen = [(s + 1) * tokens_per_step for s in table.step]
        table.tokens_per_s = [
            tokens_per_step / (ms / 1000) if ms > 0 else NAN for ms in table.ms_per_step
        ]
    return table


def _nanogpt_info(config: dict[str, float]) -> dict[str, Any]:
    def get(key: str) -> int | float | None:
        value = config.get(key)
        return None if value is None else (int(value) if value == int(value) else value)

    model = {
        "n_layers": get("n_layer"),
        "n_heads": get("n_head"),
        "dim": get("n_embd"),
        "vocab_size": get("vocab_size"),
        "context": get("block_size"),
    }
    train = {
        "batch_size": get("batch_size"),
        "grad_accum": get("gradient_accumulation_steps"),
        "lr": get("learning_rate"),
        "min_lr": get("min_lr"),
        "max_steps": get("max_iters"),
        "context": get("block_size"),
    }
    info: dict[str, Any] = {
        "model": {k: v for k, v in model.items() if v is not None},
        "train": {k: v for k, v in train.items() if v is not None},
    }
    if "params" in config:
        info["params"] = int(config["params"])
    return info


def _run_info(run_dir: Path) -> dict[str, Any]:
    """run_info.json + config.yaml; a damaged one is noted, not fatal (the curves still matter)."""
    info: dict[str, Any] = {"run_dir": str(run_dir)}
    try:
        if (run_dir / "run_info.json").exists():
            info.update(json.loads((run_dir / "run_info.json").read_text(encoding="utf-8")))
    except (OSError, ValueError) as e:
        info["warning"] = f"run_info.json unreadable: {e}"
    try:
        if (run_dir / "config.yaml").exists():
            info["config"] = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        info["warning"] = f"config.yaml unreadable: {e}"
    return info


def _derive(table: MetricsTable) -> None:
    """Wall time from step times when a log has no clock (nanoGPT): an estimate, noted in info."""
    if table.has("elapsed_s") or not table.has("ms_per_step"):
        return
    elapsed, total, previous = [], 0.0, None
    for step, ms in zip(table.step, table.ms_per_step):
        gap = step - previous if previous is not None else 1
        total += (ms if math.isfinite(ms) else 0.0) * max(gap, 0) / 1000
        elapsed.append(total)
        previous = step
    table.elapsed_s = elapsed
    table.info.setdefault("estimated", []).append("elapsed_s (sum of logged step times)")
