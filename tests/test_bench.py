"""Every benchmark under bench/ starts: its imports resolve against the package and its options
parse (`--help`), so a change in lmforge cannot break one unnoticed until somebody runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if p.name != "common.py")


def test_the_benchmarks_are_found():
    assert {"time_to_loss.py", "cpu_vs_nanogpt_shape.py", "gpu_mfu.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_starts(script):
    done = subprocess.run([sys.executable, script, "--help"], cwd=BENCH, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout
