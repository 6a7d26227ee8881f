"""`make demo`'s pipeline at a tiny size (seconds): prepare -> pretrain -> eval -> SFT -> eval ->
chat -> export (HF and GGUF) -> transformers' answers against lmforge's -> summary. The full demo
is not part of the suite; this keeps its recipe and script from breaking silently."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gguf")
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "demo.py"


@pytest.mark.slow
def test_the_demo_pipeline_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = done.stdout.split("=== demo summary ===", 1)[1]
    assert re.search(r"best val loss \d+\.\d+ nats/token; the entropy floor", summary)
    assert re.search(r"before SFT \d+\.\d %, after SFT \d+\.\d %", summary)
    same = re.search(r"greedy answers equal lmforge's on (\d+) of (\d+)", summary)
    assert same and same.group(1) == same.group(2) == "20", summary
    assert (out / "export" / "hf" / "model.safetensors").is_file()
    assert (out / "export" / "model.gguf").stat().st_size > 0
    assert "llama-cli -m" in summary and "ollama run" in summary
    for run in ("pretrain", "sft"):
        assert list((out / run / "training_plots").glob("training_summary_*.txt"))
