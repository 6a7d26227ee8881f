"""MetricsWriter (CSV/JSONL rows, resume truncation, fresh start), FLOPs per token and MFU."""

import csv
import json
import math
import sys

import pytest

from lmforge.errors import UserError
from lmforge.monitor.metrics import COLUMNS, MetricsWriter, flops_per_token, mfu


def _row(step: int, **extra: float | None) -> dict:
    return {
        "step": step,
        "tokens_seen": step * 1024,
        "elapsed_s": step * 0.05,
        "loss": 5.0 / step,
        "lr": 3e-4,
        "grad_norm": 0.9,
        "ms_per_step": 50.0,
        "tokens_per_s": 20480.0,
        "mfu": None,
        "memory_mb": 512.0,
        "val_loss": None,
        "val_ppl": None,
        **extra,
    }


def _csv_rows(log_dir):
    with open(log_dir / "training_metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_rows_reach_disk_at_once_in_the_fixed_column_order(tmp_path):
    writer = MetricsWriter(tmp_path / "logs")
    writer.write(_row(10, val_loss=2.5, val_ppl=math.exp(2.5)))
    # Not closed: a crash right now must still leave the row on disk.
    header = (tmp_path / "logs" / "training_metrics.csv").read_text().splitlines()[0]
    assert header == ",".join(COLUMNS)
    (row,) = _csv_rows(tmp_path / "logs")
    assert row["step"] == "10" and row["loss"] == "0.5" and row["mfu"] == ""
    assert row["val_ppl"] == f"{math.exp(2.5):.6g}"
    line = json.loads((tmp_path / "logs" / "metrics.jsonl").read_text())
    assert line["loss"] == 0.5 and line["mfu"] is None
    writer.close()


def test_resume_drops_rows_logged_after_the_checkpoint(tmp_path):
    log_dir = tmp_path / "logs"
    with MetricsWriter(log_dir) as writer:
        for step in range(10, 110, 10):
            writer.write(_row(step))
    # A kill -9 can also leave a torn last line.
    with open(log_dir / "training_metrics.csv", "a") as f:
        f.write("110,112640,5.5,0.04")
    with open(log_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 110, "lo')
    with MetricsWriter(log_dir, start_step=50) as writer:
        assert [r["step"] for r in _csv_rows(log_dir)] == ["10", "20", "30", "40", "50"]
        writer.write(_row(60))
    assert [r["step"] for r in _csv_rows(log_dir)] == ["10", "20", "30", "40", "50", "60"]
    steps = [json.loads(line)["step"] for line in (log_dir / "metrics.jsonl").open()]
    assert steps == [10, 20, 30, 40, 50, 60]
    assert not list(log_dir.glob("*.tmp"))


def test_a_new_run_moves_an_earlier_attempts_logs_aside(tmp_path):
    log_dir = tmp_path / "logs"
    with MetricsWriter(log_dir) as writer:
        writer.write(_row(10))
        writer.log_line("step 10 | loss 0.5")
    with MetricsWriter(log_dir) as writer:  # a new run: no checkpoint to continue from
        writer.write(_row(5))
        assert writer.moved_aside is not None and writer.moved_aside.parent == log_dir
        aside = writer.moved_aside
    assert [r["step"] for r in _csv_rows(log_dir)] == ["5"]
    assert (aside / "training_metrics.csv").read_text().splitlines()[1].startswith("10,")
    assert "loss 0.5" in (aside / "training.log").read_text()


def test_resume_cuts_every_file_to_the_checkpoints_offsets(tmp_path):
    """What was logged after the checkpoint is cut from all four files, exactly."""
    log_dir = tmp_path / "logs"
    with MetricsWriter(log_dir) as writer:
        writer.write(_row(10))
        writer.log_line("step 10")
        writer.sample("=== step 10 ===")
        offsets = writer.sync()  # what a checkpoint at step 10 records
        kept = {p.name: p.read_bytes() for p in log_dir.iterdir()}
        writer.write(_row(20))
        writer.log_line("step 20")
        writer.sample("=== step 20 ===")
    with MetricsWriter(log_dir, start_step=10, offsets=offsets) as writer:
        assert {p.name: p.read_bytes() for p in log_dir.iterdir()} == kept
        writer.write(_row(20))
    assert [r["step"] for r in _csv_rows(log_dir)] == ["10", "20"]
    assert (log_dir / "samples.txt").read_text() == "=== step 10 ===\n\n"


def test_log_line_goes_to_terminal_and_file(tmp_path, capsys):
    with MetricsWriter(tmp_path / "logs") as writer:
        writer.log_line("step 1 | loss 4.2")
    assert capsys.readouterr().out == "step 1 | loss 4.2\n"
    assert (tmp_path / "logs" / "training.log").read_text() == "step 1 | loss 4.2\n"


def test_tensorboard_without_the_package_is_a_user_error(tmp_path, monkeypatch):
    try:
        import tensorboard  # noqa: F401

        pytest.skip("tensorboard is installed: the missing-package message cannot be shown")
    except ImportError:
        pass
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(UserError, match=r"pip install 'lmforge\[tensorboard\]'"):
        MetricsWriter(tmp_path / "logs", tensorboard=True)


def test_flops_per_token_is_palm_appendix_b():
    # nanoGPT's GPT-2 124M: 85M non-embedding params... use round numbers to check the formula.
    assert flops_per_token(1_000_000, 2, 64, 128) == 6 * 1_000_000 + 12 * 2 * 64 * 128


def test_mfu_uses_the_datasheet_peak_and_none_where_unknown():
    # 100 TFLOP/s achieved on an H100 SXM in bf16 is 100/989 of peak.
    assert mfu(1e9, 1e5, "NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(1e14 / 989e12)
    assert mfu(1e9, 1e5, "NVIDIA H100 PCIe", "bfloat16") == pytest.approx(1e14 / 756e12)
    assert mfu(1e9, 1e5, "NVIDIA A100-SXM4-40GB", "fp32") == pytest.approx(1e14 / 156e12)
    assert mfu(1e9, 1e5, "NVIDIA L4", "bf16") == pytest.approx(1e14 / 121e12)
    assert mfu(1e9, 1e5, "NVIDIA L40S", "bf16") == pytest.approx(1e14 / 362e12)
    assert mfu(1e9, 1e5, "cpu", "fp32") is None
    assert mfu(1e9, 1e5, "mps", "fp16") is None
    assert mfu(1e9, 1e5, "cpu", "fp32", peak_flops=1e12) == pytest.approx(100.0)
