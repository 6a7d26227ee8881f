"""A run folder guards itself: one trainer at a time, no silent restart, no resume that changes what
is trained. Each refusal is exit 2, one stderr line, and every file in the folder unchanged."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import TINY, checksums, lmforge_subprocess, one_error_line

from lmforge.train.checkpoint import load_checkpoint

COMPARED = ("step", "tokens_seen", "loss", "lr", "grad_norm", "val_loss")


def train(data: Path, run: Path, *extra: str, **kw) -> subprocess.CompletedProcess:
    return lmforge_subprocess("train", f"--data.dir={data}", f"--run.dir={run}", *TINY, *extra,
                              **kw)  # fmt: skip


def rows(run: Path) -> list[dict[str, str]]:
    with open(run / "logs" / "training_metrics.csv", newline="") as f:
        return [{k: r[k] for k in COMPARED} for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def _finished_run(stories, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("finished") / "run"
    result = train(stories, run, "--train.max_steps=20", "--train.save_every=10")
    assert result.returncode == 0, result.stderr
    return run


@pytest.fixture
def used_run(_finished_run, tmp_path) -> Path:
    """A finished 20-step run with checkpoints at 10 and 20 (a copy: each test may change it)."""
    return Path(shutil.copytree(_finished_run, tmp_path / "run"))


def refused(run: Path, result: subprocess.CompletedProcess, before: dict[str, str]) -> str:
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr
    assert checksums(run) == before, "a refused run must leave every file as it was"
    return one_error_line(result.stderr)


@pytest.fixture(scope="module")
def byte_stories(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bytes") / "stories"
    result = lmforge_subprocess("prepare", "--builtin", "stories", "--size-mb", "0.3",
                                "--tokenizer", "byte", "--out", out)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def other_stories(tmp_path_factory) -> Path:
    """The same tokenizer (char), other text: another seed of the generator."""
    out = tmp_path_factory.mktemp("other") / "stories"
    result = lmforge_subprocess("prepare", "--builtin", "stories", "--size-mb", "0.3",
                                "--seed", "7", "--out", out)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.parametrize(
    "change, names",
    [
        (["--model.n_layers=3"], "model.n_layers 2 -> 3"),
        (["--model.context=32"], "model.context 64 -> 32"),
        (["--train.batch_size=8"], "the global batch 4 x 1 process(es) -> 8 x 1"),
        (["--train.seed=7"], "train.seed 1337 -> 7"),
        (["--data.mode=doc"], "data.mode 'random' -> 'doc'"),
        (["--optim.name=muon"], "optim.name 'adamw' -> 'muon'"),
    ],
)
def test_a_resume_that_changes_what_is_trained_is_refused(stories, used_run, change, names):
    before = checksums(used_run)
    result = train(stories, used_run, "--train.max_steps=30", *change)
    line = refused(used_run, result, before)
    assert names in line and "--train.init_from=" in line and "new --run.dir" in line


def test_a_resume_on_another_tokenizer_or_other_data_is_refused(
    stories, byte_stories, other_stories, used_run
):
    before = checksums(used_run)
    line = refused(used_run, train(byte_stories, used_run, "--train.max_steps=30"), before)
    assert "tokenizer char -> byte" in line
    line = refused(used_run, train(other_stories, used_run, "--train.max_steps=30"), before)
    assert "the data (" in line and "train_tokens" in line


def test_safe_changes_are_allowed_and_recorded(stories, used_run):
    result = train(stories, used_run, "--train.max_steps=30", "--log.log_every=5",
                   "--train.eval_every=15", "--train.patience=4")  # fmt: skip
    assert result.returncode == 0, result.stderr
    changed = next(line for line in result.stdout.splitlines() if line.startswith("changed"))
    for text in ("log.log_every 1 -> 5", "train.max_steps 20 -> 30", "train.patience 0 -> 4"):
        assert text in changed
    assert "max_steps: 20" in (used_run / "config.previous.yaml").read_text()
    assert "max_steps: 30" in (used_run / "config.yaml").read_text()


def test_resume_none_on_a_used_folder_is_refused(stories, used_run):
    before = checksums(used_run)
    line = refused(used_run, train(stories, used_run, "--train.resume=none"), before)
    assert "step_10.pt" in line and "step_20.pt" in line and "train.resume=auto" in line


def test_a_folder_whose_every_checkpoint_is_corrupt_is_refused(stories, used_run):
    for path in (used_run / "checkpoints").glob("step_*.pt"):
        blob = bytearray(path.read_bytes())
        blob[len(blob) // 2] ^= 0xFF
        path.write_bytes(bytes(blob))
    before = checksums(used_run)
    line = refused(used_run, train(stories, used_run, "--train.max_steps=30"), before)
    assert "none of the checkpoints" in line and "verifies" in line


def test_only_weights_left_is_refused_not_restarted(stories, used_run):
    for path in (used_run / "checkpoints").glob("step_*"):
        path.unlink()
    before = checksums(used_run)
    line = refused(used_run, train(stories, used_run, "--train.max_steps=30"), before)
    assert "best.pt" in line and "no step checkpoint" in line


def test_a_busy_folder_is_refused_and_a_dead_owners_lock_never_blocks(stories, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "lmforge", "train", f"--data.dir={stories}", f"--run.dir={run}",
           *TINY, "--train.max_steps=100000", "--train.save_every=5"]  # fmt: skip
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list((run / "checkpoints").glob("step_*.pt")):
            time.sleep(0.05)
        assert "lmforge pid" in (run / ".lock").read_text()
        os.kill(first.pid, signal.SIGSTOP)  # hold it still, so that the folder cannot change
        before = checksums(run)
        line = refused(run, train(stories, run, "--train.max_steps=100000"), before)
        assert f"in use by lmforge pid {first.pid}" in line
    finally:
        first.kill()  # kill -9: its lock goes with it
        first.wait()
    result = train(stories, run, "--train.max_steps=12", "--train.save_every=5")
    assert result.returncode in (0,), result.stderr
    assert f"pid {first.pid}" not in (run / ".lock").read_text()


def test_raising_max_steps_continues_a_finished_run_exactly(stories, tmp_path):
    """A finished run ends with a full step checkpoint: raised max_steps continues it, and the
    result equals one longer uninterrupted run (the schedule decays over 40 steps in both)."""
    schedule = "--schedule.decay_steps=40"
    whole, extended = tmp_path / "whole", tmp_path / "extended"
    assert train(stories, whole, "--train.max_steps=40", schedule).returncode == 0
    first = train(stories, extended, "--train.max_steps=20", schedule, "--train.save_every=0")
    assert first.returncode == 0, first.stderr
    assert (extended / "checkpoints" / "step_20.pt").is_file()  # written by the end of the run
    again = train(stories, extended, "--train.max_steps=20", schedule)
    assert again.returncode == 0 and "already finished at step 20" in again.stdout
    more = train(stories, extended, "--train.max_steps=40", schedule)
    assert more.returncode == 0, more.stderr
    assert "resumed from" in more.stdout and "step_20.pt" in more.stdout
    assert rows(extended) == rows(whole)
    a = load_checkpoint(whole / "checkpoints" / "final_model.pt")["model"]
    b = load_checkpoint(extended / "checkpoints" / "final_model.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
