"""What a killed run left (temporary checkpoint files, half-written logs' temporaries) is removed
when the next run starts; only lmforge's own names of dead processes, never anything else."""

from __future__ import annotations

import os

from helpers import TINY, lmforge_subprocess

DEAD = 2**22 + 12345  # above Linux's default pid_max: no process has it


def test_stale_temporaries_are_cleaned_at_start_and_nothing_else(stories, tmp_path):
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    ckpts.mkdir(parents=True)
    stale = [ckpts / f".step_5.pt.tmp-{DEAD}", ckpts / f".step_5.json.tmp-{DEAD}",
             run / f".config.yaml.tmp-{DEAD}", run / f".run_info.json.tmp-{DEAD}"]  # fmt: skip
    for path in stale:
        path.write_bytes(b"x" * 1000)
    alive = ckpts / f".step_7.pt.tmp-{os.getpid()}"  # a live process's: not ours to remove
    alive.write_bytes(b"y")
    mine = [run / "notes.txt", ckpts / ".keep", ckpts / "step_5.pt.tmp-backup"]
    for path in mine:
        path.write_text("the user's")
    result = lmforge_subprocess("train", f"--data.dir={stories}", f"--run.dir={run}", *TINY,
                                "--train.max_steps=4")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert not any(p.exists() for p in stale)
    assert alive.exists() and all(p.read_text() == "the user's" for p in mine)
