"""Where a metrics row is written: training.log, training_metrics.csv, metrics.jsonl, TensorBoard.

Also the two numbers the trainer needs to report efficiency: FLOPs per token and MFU.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.errors import UserError


@dataclass
class MetricsRow:
    """One logged step: its fields are the columns of logs/training_metrics.csv, in order (scripts
    and `lmforge report` rely on them). Train rows have `loss`; eval rows have `val_loss`; a step
    that is both has both. None is an empty cell."""

    step: int
    tokens_seen: int = 0
    elapsed_s: float = 0.0
    loss: float | None = None
    lr: float | None = None
    grad_norm: float | None = None
    ms_per_step: float | None = None
    tokens_per_s: float | None = None
    mfu: float | None = None
    memory_mb: float | None = None
    val_loss: float | None = None
    val_ppl: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


COLUMNS = tuple(f.name for f in dataclasses.fields(MetricsRow))
CSV_NAME, JSONL_NAME, LOG_NAME = "training_metrics.csv", "metrics.jsonl", "training.log"
SAMPLES_NAME = "samples.txt"


def _compact(value: Any) -> Any:
    """6 significant digits: enough for a loss curve, and the CSV stays readable."""
    if isinstance(value, float) and math.isfinite(value):
        return float(f"{value:.6g}")
    return value


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)  # "nan" stays visible
    return str(value)


def _step_of(value: Any) -> int | None:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return None  # a torn last line from a kill -9


def _kept(value: Any, resume_step: int) -> bool:
    row_step = _step_of(value)
    return row_step is not None and row_step <= resume_step


class MetricsWriter:
    """A run's log files: training.log (the printed lines), training_metrics.csv and metrics.jsonl
    (one row per logged step), samples.txt, and TensorBoard scalars when asked for.

    Each row and line is flushed at once, so a crashed process loses nothing it wrote; `sync()`
    (called for every checkpoint) also fsyncs them and returns each file's length, which the
    checkpoint records. A run resumed from that checkpoint cuts every file back to those lengths
    (`offsets`): what the earlier process logged after its checkpoint is written again by the
    resumed one, so nothing is repeated or torn. Checkpoints without offsets (older lmforge) cut the
    CSV and JSONL rows after `start_step`.

    A new run (`start_step=0`, no offsets) in a folder that holds log files of an earlier attempt
    that never reached a checkpoint moves them into `logs/earlier-YYYYMMDD-HHMMSS/`, never deletes.
    """

    def __init__(
        self,
        log_dir: str | Path,
        start_step: int = 0,
        offsets: dict[str, int] | None = None,
        tensorboard: bool = False,
        purge_step: int | None = None,
    ) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.log_dir / CSV_NAME
        self.jsonl_path = self.log_dir / JSONL_NAME
        self.log_path = self.log_dir / LOG_NAME
        self.samples_path = self.log_dir / SAMPLES_NAME
        self.moved_aside: Path | None = None
        paths = (self.csv_path, self.jsonl_path, self.log_path, self.samples_path)
        if offsets:
            for path in paths:
                _cut(path, offsets.get(path.name, 0))
        elif start_step:
            self._truncate_after(start_step)
        elif any(p.exists() for p in paths):
            self.moved_aside = self.log_dir / f"earlier-{time.strftime('%Y%m%d-%H%M%S')}"
            self.moved_aside.mkdir(exist_ok=True)
            for path in paths:
                if path.exists():
                    os.replace(path, self.moved_aside / path.name)
        new_csv = not self.csv_path.exists() or self.csv_path.stat().st_size == 0
        self._csv = open(self.csv_path, "a", newline="", encoding="utf-8")  # noqa: SIM115
        self._csv_writer = csv.DictWriter(
            self._csv, COLUMNS, extrasaction="ignore", lineterminator="\n"
        )
        if new_csv:
            self._csv_writer.writeheader()
            self._csv.flush()
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")  # noqa: SIM115
        self._log = open(self.log_path, "a", encoding="utf-8")  # noqa: SIM115
        self._samples = open(self.samples_path, "a", encoding="utf-8")  # noqa: SIM115
        files = (self._csv, self._jsonl, self._log, self._samples)
        self._files = {p.name: f for p, f in zip(paths, files)}
        self._tb = None
        if tensorboard:
            self._tb = _open_tensorboard(self.log_dir.parent / "tensorboard", purge_step)

    def _truncate_after(self, step: int) -> None:
        """Keep only rows with step <= `step`; written to a temp file then renamed over."""
        from lmforge.files import write_atomic

        if self.csv_path.exists():
            with open(self.csv_path, newline="", encoding="utf-8") as f:
                rows = [r for r in csv.DictReader(f) if _kept(r.get("step"), step)]
            buf = io.StringIO()
            writer = csv.DictWriter(buf, COLUMNS, extrasaction="ignore", lineterminator="\n")
            writer.writeheader()
            writer.writerows({k: row.get(k) or "" for k in COLUMNS} for row in rows)
            write_atomic(self.csv_path, buf.getvalue())
        if self.jsonl_path.exists():
            kept = []
            for line in self.jsonl_path.read_text(encoding="utf-8").splitlines():
                try:
                    if _kept(json.loads(line).get("step"), step):
                        kept.append(line + "\n")
                except (json.JSONDecodeError, AttributeError):
                    continue
            write_atomic(self.jsonl_path, "".join(kept))

    def write(self, row: MetricsRow | dict[str, Any]) -> None:
        """One logged step. Keys outside COLUMNS go to the JSONL only; None is an empty cell."""
        values = row.as_dict() if isinstance(row, MetricsRow) else row
        with self._named(self.csv_path):
            self._csv_writer.writerow({k: _cell(values.get(k)) for k in COLUMNS})
            self._csv.flush()
        full = {**dict.fromkeys(COLUMNS), **values}  # the CSV's columns, then any extras
        with self._named(self.jsonl_path):
            self._jsonl.write(json.dumps({k: _compact(v) for k, v in full.items()}) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            step = int(values["step"])
            for key, value in values.items():
                numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
                if key != "step" and numeric:
                    tag = f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"
                    self._tb.add_scalar(tag, value, step)

    def log_line(self, text: str) -> None:
        """A human line: to the terminal and to logs/training.log."""
        print(text, flush=True)
        with self._named(self.log_path):
            self._log.write(text + "\n")
            self._log.flush()

    def sample(self, text: str) -> None:
        """A block of periodic samples: to the terminal, training.log and samples.txt."""
        self.log_line(text)
        with self._named(self.samples_path):
            self._samples.write(text + "\n\n")
            self._samples.flush()

    def sync(self) -> dict[str, int]:
        """Flush and fsync every file; returns their lengths (what a checkpoint records)."""
        sizes = {}
        for name, f in self._files.items():
            with self._named(self.log_dir / name):
                f.flush()
                os.fsync(f.fileno())
                sizes[name] = os.fstat(f.fileno()).st_size
        if self._tb is not None:
            self._tb.flush()
        return sizes

    def close(self) -> None:
        """Flush, fsync (the end of a run survives a power cut) and close; best effort: after a
        failed write the disk may still refuse, and the error that matters was raised already."""
        for f in self._files.values():
            try:
                if not f.closed:
                    f.flush()
                    os.fsync(f.fileno())
            except OSError:
                pass
            finally:
                with contextlib.suppress(OSError):
                    f.close()
        if self._tb is not None:
            with contextlib.suppress(Exception):
                self._tb.close()
            self._tb = None

    @contextlib.contextmanager
    def _named(self, path: Path):
        """An OSError of a write becomes the one-line error naming the file (disk full, ...)."""
        try:
            yield
        except OSError as e:
            from lmforge.files import disk_error

            raise disk_error(path, e) from None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _cut(path: Path, size: int) -> None:
    """Shorten `path` to `size` bytes (a file already shorter is left alone)."""
    if not path.exists():
        return
    with open(path, "r+b") as f:
        if f.seek(0, os.SEEK_END) > size:
            f.truncate(size)
            f.flush()
            os.fsync(f.fileno())


def _open_tensorboard(path: Path, purge_step: int | None) -> Any:
    try:  # lazily: tensorboard is an optional extra
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise UserError(
            "log.tensorboard=true needs the tensorboard package: pip install 'lmforge[tensorboard]'"
        ) from e
    # purge_step: a resumed run drops the scalars the earlier process logged after its checkpoint.
    return SummaryWriter(log_dir=str(path), purge_step=purge_step)


# Dense tensor-core peaks in FLOP/s per GPU, from the vendors' datasheets, as
# (bf16/fp16 with fp32 accumulate, fp32). The fp32 figure is the TF32 tensor-core peak where the
# chip has TF32 (Ampere and later): lmforge turns TF32 on, so fp32 matmuls run there. That is
# generous — TF32 keeps a 10-bit mantissa, and non-matmul work runs at the much lower plain fp32
# rate — so fp32 MFU reads lower than the same run in bf16 would. Chips without TF32 (V100, T4)
# use their plain fp32 peak and their fp16 peak for half precision (they have no bf16 units).
# Sparse ("with sparsity") datasheet figures are 2x these and never used. Order matters:
# the first pattern that matches the device name wins.
GPU_PEAK_FLOPS: tuple[tuple[str, float, float], ...] = (
    (r"h100.*pcie", 756e12, 378e12),
    (r"h100.*nvl", 835e12, 418e12),
    (r"\bgh200|\bh200|\bh100", 989e12, 495e12),  # SXM; H200 has H100's compute, more memory
    (r"\bb200", 2250e12, 1100e12),
    (r"\ba100", 312e12, 156e12),
    (r"\bl40s\b", 362e12, 183e12),
    (r"\bl40\b", 181e12, 90e12),
    (r"\ba10g\b", 125e12, 62.5e12),  # AWS's A10 variant; NVIDIA publishes A10's figures only
    (r"\ba10\b", 125e12, 62.5e12),
    (r"\bl4\b", 121e12, 60e12),
    (r"rtx a6000|a6000", 155e12, 77e12),
    (r"rtx 4090", 165e12, 82.6e12),
    (r"rtx 3090", 71e12, 35.6e12),
    (r"\bv100", 125e12, 15.7e12),
    (r"\bt4\b", 65e12, 8.1e12),
)


def peak_flops_for(device_name: str, dtype: str) -> float | None:
    """Datasheet peak for a CUDA device name (torch.cuda.get_device_name()), or None if unknown."""
    name = device_name.lower()
    half = any(h in dtype.lower() for h in ("bf16", "bfloat16", "fp16", "float16", "half"))
    for pattern, half_peak, fp32_peak in GPU_PEAK_FLOPS:
        if re.search(pattern, name):
            return half_peak if half else fp32_peak
    return None


def mfu(
    flops_per_token: float,
    tokens_per_s: float,
    device_name: str,
    dtype: str,
    peak_flops: float | None = None,
) -> float | None:
    """Model FLOPs utilisation as a fraction (0.41), or None when the peak is unknown.

    CPU and MPS have no honest single peak figure, so they give None unless `peak_flops` is passed.
    """
    peak = peak_flops if peak_flops is not None else peak_flops_for(device_name, dtype)
    if not peak or tokens_per_s <= 0 or not flops_per_token:
        return None
    return flops_per_token * tokens_per_s / peak


def flops_per_token(n_params: int, n_layers: int, dim: int, context: int) -> int:
    """Training FLOPs per token: 6·N + 12·L·d·T (PaLM appendix B, as nanoGPT counts).

    N is all parameters minus learned position embeddings (nanoGPT's
    `get_num_params(non_embedding=True)`): the tied token embedding counts once, because as the
    LM head it is a matmul; a position-embedding lookup is not. With RoPE there is nothing to
    subtract. 6 = forward + backward multiply-adds per weight; 12·L·d·T is attention's QK^T and
    AV, which no weight accounts for (T = context, the full, non-causal-discounted count).
    """
    return 6 * int(n_params) + 12 * n_layers * dim * context
