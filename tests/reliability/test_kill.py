"""kill -9 at 20 moments of a run (during steps, checkpoint writes, evals and dashboard refreshes),
resuming each time: the final weights equal an uninterrupted run's bit for bit, the metrics have no
duplicated or torn row, and every checkpoint left verifies. Dropout is on and the default warm-up
passes run, so the RNG state and the data position must both come back exactly."""

from __future__ import annotations

import csv
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import TINY

from lmforge.train.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow

RUN = [
    *TINY,
    "--model.dropout=0.1",
    "--train.warmup_passes=3",
    "--train.max_steps=96",
    "--train.save_every=3",
    "--train.keep_last=3",
    "--train.eval_every=6",
    "--train.sample_every=6",
    "--log.plot_every=6",
    "--train.eval_batches=8",
    "--train.threads=1",
]
COMPARED = ("step", "tokens_seen", "loss", "lr", "grad_norm", "val_loss", "val_ppl")
# Where a kill lands: each is waited for by watching the files the run writes.
MOMENTS = ("checkpoint write", "eval", "dashboard refresh", "step")


def command(data: Path, run: Path) -> list[str]:
    return [sys.executable, "-m", "lmforge", "train", f"--data.dir={data}", f"--run.dir={run}",
            *RUN]  # fmt: skip


def saved_steps(run: Path) -> set[int]:
    return {int(p.stem.split("_")[1]) for p in (run / "checkpoints").glob("step_*.pt")}


def moment_reached(moment: str, run: Path, since: set[int]) -> bool:
    """True while the run is in `moment`. Except for the dashboard (refreshed once per attempt,
    before the attempt's first save), only after the attempt saved a checkpoint, so that the run
    moves forward."""
    ckpts, plots, log = run / "checkpoints", run / "training_plots", run / "logs" / "training.log"
    if moment == "dashboard refresh":  # the live refresh, not the final report
        return plots.is_dir() and any(p.name.startswith(".dashboard.png.tmp-")
                                      for p in plots.iterdir())  # fmt: skip
    if not saved_steps(run) - since:
        return False
    if moment == "checkpoint write":
        return any(p.name.startswith(".step_") for p in ckpts.iterdir())
    if moment == "eval":  # the step line of an eval step is out, its eval line not yet
        lines = log.read_text().splitlines() if log.exists() else []
        last = lines[-1] if lines else ""
        if last.startswith("step ") and "/" in last:
            step = int(last.split()[1].split("/")[0])
            return step % 6 == 0
        return False
    return True  # "step": any time after the attempt's first checkpoint


def rows(run: Path) -> list[dict[str, str]]:
    with open(run / "logs" / "training_metrics.csv", newline="") as f:
        return [{k: r[k] for k in COMPARED} for r in csv.DictReader(f)]


def test_kill_9_twenty_times_then_the_same_weights(stories, tmp_path):
    reference = tmp_path / "reference"
    done = subprocess.run(command(stories, reference), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr

    run, rng = tmp_path / "killed", random.Random(0)
    landed: dict[str, int] = dict.fromkeys(MOMENTS, 0)
    plan = [MOMENTS[i % len(MOMENTS)] for i in range(20)]
    for moment in plan:
        since = saved_steps(run) if run.exists() else set()
        proc = subprocess.Popen(command(stories, run), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # fmt: skip
        delay = rng.uniform(0.0, 0.05) if moment == "step" else 0.0
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            if moment_reached(moment, run, since):
                time.sleep(delay)
                proc.send_signal(signal.SIGKILL)
                landed[moment] += 1
                at = max(saved_steps(run) or {0})
                print(f"kill {sum(landed.values())}: {moment}, newest checkpoint step {at}")
                break
            time.sleep(0.001)
        proc.wait(timeout=60)
        assert proc.returncode in (-signal.SIGKILL, 0), proc.returncode
        if proc.returncode == 0:
            break  # the run finished before this kill could land
    assert sum(landed.values()) >= 15, landed
    final = subprocess.run(command(stories, run), capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr
    print(f"\nkills by moment: {landed}")

    assert rows(run) == rows(reference)  # no duplicated, torn or missing row
    a = load_checkpoint(reference / "checkpoints" / "final_model.pt")["model"]
    b = load_checkpoint(run / "checkpoints" / "final_model.pt")["model"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "final weights differ from the uninterrupted"
    for path in (run / "checkpoints").glob("*.pt"):
        load_checkpoint(path)  # every checkpoint left verifies
    leftovers = [p for p in (run / "checkpoints").iterdir() if ".tmp-" in p.name]
    assert not leftovers, leftovers  # the last, finishing run cleaned what the kills left
