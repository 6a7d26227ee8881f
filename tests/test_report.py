"""Report: overfitting verdicts, dashboard/summary/JSON files, compare, live refresh, CLI errors."""

import importlib.util
import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lmforge.monitor.logparse import load_metrics
from lmforge.monitor.metrics import MetricsWriter
from lmforge.monitor.report import (
    LiveDashboard,
    compare_runs,
    overfitting_verdict,
    write_report,
    write_summary,
)

FLOOR = 1.3


def _history(kind: str, steps: int = 1000, eval_every: int = 50):
    """(train_steps, train_loss, val_steps, val_loss) with seeded noise."""
    rng = np.random.default_rng(0)
    s = np.arange(1, steps + 1)
    train = FLOOR + 3 * np.exp(-s / 150) * (1 + 0.03 * rng.standard_normal(steps))
    if kind == "overfitting":
        train = train - 0.4 * s / steps  # memorising: train keeps falling...
    if kind == "diverging":
        train = train + np.where(s > 600, (s - 600) / 40, 0)  # ...or the optimiser blows up
    vs = s[eval_every - 1 :: eval_every]
    val = FLOOR + 0.05 + 3 * np.exp(-vs / 150)
    if kind == "overfitting":
        val = val + 0.3 * np.maximum(0, vs - 400) / steps  # ...while validation rises
    return s.tolist(), train.tolist(), vs.tolist(), val.tolist()


@pytest.mark.parametrize(
    ("kind", "verdict"),
    [
        ("healthy", "no sign of overfitting"),
        ("overfitting", "overfitting"),
        ("diverging", "diverging"),
    ],
)
def test_three_histories_get_three_verdicts(kind, verdict):
    got, rule = overfitting_verdict(*_history(kind))
    assert got == verdict
    assert any(ch.isdigit() for ch in rule)  # the rule quotes the numbers it checked


def test_verdict_edge_cases():
    s, train, vs, val = _history("healthy")
    assert overfitting_verdict(s, train, vs[:2], val[:2])[0] == "not enough validation points"
    train[500] = math.nan
    verdict, rule = overfitting_verdict(s, train, vs, val)
    assert verdict == "diverging" and "step 501" in rule


def make_run(
    run: Path,
    kind: str = "healthy",
    steps: int = 1000,
    floor: float | None = FLOOR,
    optimizer: str = "adamw",
) -> Path:
    s, train, vs, val = _history(kind, steps)
    run.mkdir(parents=True)
    info = {
        "params": 10_650_000,
        "tokenizer": "char",
        "entropy_floor": floor,
        "phase": "pretrain",
        "model": {
            "block": "llama",
            "n_layers": 6,
            "dim": 384,
            "n_heads": 6,
            "n_kv_heads": 2,
            "vocab_size": 65,
            "context": 256,
        },
        "train": {
            "batch_size": 64,
            "grad_accum": 1,
            "lr": 3e-4,
            "min_lr": 3e-5,
            "optimizer": optimizer,
            "schedule": "cosine",
            "device": "cpu",
            "dtype": "fp32",
            "max_steps": steps,
        },
    }
    (run / "run_info.json").write_text(json.dumps(info))
    (run / "config.yaml").write_text("train:\n  max_steps: 1000\n")
    val_at = dict(zip(vs, val))
    with MetricsWriter(run / "logs") as writer:
        for step, loss in zip(s, train):
            writer.write(
                {
                    "step": step,
                    "tokens_seen": step * 16384,
                    "elapsed_s": step * 0.04,
                    "loss": loss,
                    "lr": 3e-4,
                    "ms_per_step": 40.0,
                    "tokens_per_s": 4e5,
                    "val_loss": val_at.get(step),
                }
            )
    return run


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_write_report_on_a_run_folder(tmp_path):
    run = make_run(tmp_path / "run")
    paths = write_report(run)
    assert set(paths) == {"png", "summary", "json"}
    for path in paths.values():
        assert path.parent == run / "training_plots" and path.stat().st_size > 0
    assert paths["png"].name.startswith("training_metrics_")
    width, height = _png_size(paths["png"])
    assert width >= 1000 and height >= 1000
    import matplotlib.image

    pixels = matplotlib.image.imread(paths["png"])
    assert pixels.std() > 0.05  # curves and text, not a blank canvas
    summary = paths["summary"].read_text()
    for needle in (
        "params 10.65M",
        "layers 6",
        "vocab 65",
        "improvement x",
        "mean 40.0 ms",
        "MFU: unknown",
        "best",
        "Verdict: no sign of overfitting",
        "Entropy floor",
    ):
        assert needle in summary, needle
    dump = json.loads(paths["json"].read_text())
    assert dump["format"] == "lmforge-run" and len(dump["metrics"]["loss"]) == 1000
    assert dump["summary"]["best_minus_floor"] == pytest.approx(
        0.05 + 3 * math.exp(-1000 / 150),
        abs=1e-5,  # the CSV keeps 6 significant digits
    )


def test_summary_flags_val_below_the_entropy_floor(tmp_path):
    run = make_run(tmp_path / "run", floor=2.0)
    assert "below the entropy floor" in write_summary(load_metrics(run))


def test_report_of_a_nanogpt_log_goes_beside_it(tmp_path):
    log = tmp_path / "train.log"
    log.write_text(
        "".join(
            f"iter {i}: loss {4 - i / 100:.4f}, time 21.00ms, mfu 17.00%\n"
            for i in range(0, 100, 10)
        )
    )
    paths = write_report(log)
    assert paths["png"].parent == tmp_path / "training_plots"
    assert "format: nanogpt-stdout" in paths["summary"].read_text()


def test_compare_two_runs(tmp_path):
    a = make_run(tmp_path / "a")
    b = make_run(tmp_path / "b", kind="overfitting", optimizer="muon")
    out = compare_runs([a, b], tmp_path / "cmp")
    assert out.parent == tmp_path / "cmp" and _png_size(out)[0] >= 1000


def test_live_dashboard_refreshes_on_multiples_of_every(tmp_path):
    run = make_run(tmp_path / "run", steps=200)
    live = LiveDashboard(run, every=100, keep_iterations=True)
    live.BUDGET = math.inf  # always refresh here; the budget is for real training
    assert live.maybe_refresh(150) is None
    assert live.maybe_refresh(100) == run / "training_plots" / "dashboard.png"
    assert (run / "training_plots" / "iter_100_dashboard.png").exists()
    paths = live.final()
    assert paths["png"].exists() and (run / "training_plots" / "dashboard.png").exists()


def test_live_dashboard_survives_a_run_without_rows_yet(tmp_path, capsys):
    (tmp_path / "run" / "logs").mkdir(parents=True)
    (tmp_path / "run" / "logs" / "training_metrics.csv").write_text("")
    assert LiveDashboard(tmp_path / "run", every=10).maybe_refresh(10) is None
    assert "skipped" in capsys.readouterr().out


def _cli_has_report() -> bool:
    if importlib.util.find_spec("lmforge.cli") is None:
        return False
    result = subprocess.run(
        [sys.executable, "-m", "lmforge", "report", "--help"], capture_output=True, text=True
    )
    return result.returncode == 0


def test_cli_report_on_a_missing_path_exits_2(tmp_path):
    if not _cli_has_report():
        pytest.skip("lmforge.cli has no `report` command yet (wired by the CLI owner)")
    result = subprocess.run(
        [sys.executable, "-m", "lmforge", "report", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "no such file" in result.stderr
