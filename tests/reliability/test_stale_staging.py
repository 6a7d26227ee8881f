"""What a killed `lmforge export` leaves beside its output (a staging folder `.OUT.tmp-PID-XXXX`,
a `.model.gguf.tmp-PID` file) is removed by the next export, and only that: a live process's
staging and names of other patterns stay. (prepare's are in test_prepare.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from lmforge.config import ModelConfig
from lmforge.export import export_gguf, export_hf
from lmforge.model import Transformer
from lmforge.tokenizers import ByteTokenizer


def dead_pid() -> int:
    """The id of a process that has exited."""
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)  # fmt: skip
    return int(child.stdout)


def test_export_removes_what_a_killed_export_left(tmp_path: Path) -> None:
    tokenizer = ByteTokenizer()  # gguf takes byte-level vocabularies
    torch.manual_seed(0)
    model = Transformer(ModelConfig(n_layers=1, dim=32, n_heads=2, context=16,
                                    vocab_size=tokenizer.vocab_size))  # fmt: skip
    dead = dead_pid()
    stale = tmp_path / f".hf.tmp-{dead}-k3x9_q2a"  # what tempfile.mkdtemp named it
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 4096)
    stale_gguf = tmp_path / f".model.gguf.tmp-{dead}"
    stale_gguf.write_bytes(b"GGUF")
    live = tmp_path / f".hf.tmp-{os.getpid()}-abcdefgh"  # an export running now: left alone
    live.mkdir()
    other = tmp_path / ".hf.tmp-mine"  # not the pattern: left alone
    other.write_text("keep")

    written = export_hf(model, tokenizer, tmp_path / "hf")
    assert {p.name for p in written} >= {"config.json", "model.safetensors"}
    assert not stale.exists() and live.is_dir() and other.read_text() == "keep"
    export_gguf(model, tokenizer, tmp_path / "model.gguf")
    assert not stale_gguf.exists() and (tmp_path / "model.gguf").stat().st_size > 0
    leftovers = {p.name for p in tmp_path.iterdir()}
    assert leftovers == {"hf", "model.gguf", live.name, other.name}
