"""Helpers several test modules share (fixtures are in conftest.py): running the CLI in-process or
as a child process, tiny run folders, templated story Q&A data, checksums of folders."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.config import Config, ModelConfig
from lmforge.model import Transformer
from lmforge.tokenizers import CharTokenizer
from lmforge.train.checkpoint import save_checkpoint

# The tiny model and loop of the end-to-end tests: seconds per run on 2 cores.
TINY = [
    "--model.n_layers=2",
    "--model.dim=32",
    "--model.n_heads=2",
    "--model.context=64",
    "--train.batch_size=4",
    "--schedule.warmup_steps=5",
    "--optim.lr=3e-3",
    "--train.sample_every=0",
    "--log.plot_every=0",
    "--train.warmup_passes=0",
    "--log.log_every=1",
    "--train.eval_every=10",
    "--train.eval_batches=2",
    "--train.save_every_minutes=0",
    "--train.threads=1",  # the suite runs two tests at a time on two cores (pytest -n 2)
]

NAMES = ["Ben", "Mia", "Tom", "Lily", "Sam", "Anna"]
THINGS = ["ball", "kite", "hat", "cup", "book", "boat"]
COLOURS = ["red", "blue", "green", "yellow"]
# Every character the templated data uses, so the char vocabulary has no unknowns.
ALPHABET = "".join(sorted(set(" .?\n" + "".join(NAMES + THINGS + COLOURS)
                              + "hadgvetoWwcolrfTkyabcdefghijklmnopqrstuvwxyz")))  # fmt: skip


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def lmforge(*argv: str | Path) -> int:
    """Run `lmforge ARGV` in-process, as the CLI does; the exit status (output is not captured,
    so tests read it with capsys)."""
    from lmforge.cli import main

    return main([str(a) for a in argv])


def lmforge_captured(*argv: str | Path) -> Result:
    """Run `lmforge ARGV` in-process and capture what it printed."""
    from lmforge.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main([str(a) for a in argv])
    return Result(status, out.getvalue(), err.getvalue())


def lmforge_subprocess(*argv: str | Path, input: str | None = None,
                       timeout: float = 300, **kw) -> subprocess.CompletedProcess:  # fmt: skip
    """`python -m lmforge ARGV` in a child process."""
    cmd = [sys.executable, "-m", "lmforge", *(str(a) for a in argv)]
    return subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout, **kw)


def one_error_line(err: str) -> str:
    """The one stderr line of a refused command (asserting there is exactly one)."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("lmforge: error:"), err
    return lines[0]


def checksums(*paths: Path) -> dict[str, str]:
    """SHA-256 of every file under `paths`: what a refused command must leave unchanged."""
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*")))
             if f.is_file()]  # fmt: skip
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def story_records(n: int, seed: int = 0) -> list[dict]:
    """Built-in-style story Q&A records: the answer is always a word of the story."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        name, friend = rng.sample(NAMES, 2)
        thing, colour = rng.choice(THINGS), rng.choice(COLOURS)
        story = f"{name} had a {colour} {thing}. {name} gave it to {friend}."
        question, answer = rng.choice([(f"Who had the {thing}?", name),
                                       (f"What color was the {thing}?", colour),
                                       (f"Who got the {thing}?", friend)])  # fmt: skip
        records.append({"story": story, "question": question, "answer": answer,
                        "story_index": i})  # fmt: skip
    return records


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def make_tiny_run(root: Path, tokenizer=None, phase: str = "pretrain",
                  pad_vocab_multiple: int = 64, context: int = 96,
                  data_dir: str = "") -> Path:  # fmt: skip
    """A run folder (checkpoints/final_model.pt + tokenizer/) with a random 2x32 model."""
    tok = tokenizer or CharTokenizer.build([ALPHABET])
    model_cfg = ModelConfig(
        n_layers=2,
        dim=32,
        n_heads=2,
        context=context,
        vocab_size=tok.vocab_size,
        pad_vocab_multiple=pad_vocab_multiple,
    )
    cfg = Config(model=model_cfg)
    cfg.data.dir = data_dir
    torch.manual_seed(0)
    model = Transformer(model_cfg)
    state = {"model": model.state_dict(), "config": cfg.to_dict(), "tokenizer": tok.identity(),
             "step": 0, "phase": phase}  # fmt: skip
    save_checkpoint(root / "checkpoints" / "final_model.pt", state, {"step": 0})
    tok.save(root / "tokenizer")
    return root
