"""Fixtures shared by the whole suite: prepared built-in stories, tiny pretrained runs, and a
per-session cache folder (the CPU's measured matmul peak is cached there once, not in ~)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import TINY, lmforge_subprocess


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory):
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))


def pytest_configure(config):
    """One thread per test process: `make test` runs two tests at a time (pytest -n 2) on two
    cores, and two processes of two threads each would wait on each other's barriers."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def stories(tmp_path_factory) -> Path:
    """The built-in story corpus, 0.3 MB, char tokenizer (read-only: copy it to change it)."""
    out = tmp_path_factory.mktemp("data") / "stories"
    result = lmforge_subprocess("prepare", "--builtin", "stories", "--size-mb", "0.3", "--out", out)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="session")
def pretrained(stories, tmp_path_factory) -> Path:
    """A 20-step tiny pretraining run on `stories` (read-only)."""
    run = tmp_path_factory.mktemp("pretrained") / "run"
    result = lmforge_subprocess("train", f"--data.dir={stories}", f"--run.dir={run}", *TINY,
                                "--train.max_steps=20", "--train.save_every=10")  # fmt: skip
    assert result.returncode == 0, result.stderr
    return run
