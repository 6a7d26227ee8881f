"""torchrun on CPU (gloo, 2 processes): DDP and FSDP2 give the loss curve of one process with the
same global batch; a 2-process checkpoint resumes in 1 process; SIGTERM to the group saves once."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

TINY = [
    "--model.n_layers=2",
    "--model.dim=32",
    "--model.n_heads=2",
    "--model.context=64",
    "--schedule.warmup_steps=5",
    "--optim.lr=3e-3",
    "--train.sample_every=0",
    "--log.plot_every=0",
    "--train.warmup_passes=0",
    "--log.log_every=1",
    "--train.eval_every=10",
    "--train.eval_batches=2",
    "--train.threads=1",
    "--train.save_every_minutes=0",
]


def torchrun(n: int) -> list[str]:
    """n processes under torchrun; 0 is a plain process, not launched by torchrun."""
    if n == 0:
        return [sys.executable, "-m", "lmforge"]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={n}",
        "--standalone",
        "-m",
        "lmforge",
    ]


def train(n: int, data: Path, run: Path, *extra: str, batch: int) -> subprocess.CompletedProcess:
    cmd = [
        *torchrun(n),
        "train",
        f"--data.dir={data}",
        f"--run.dir={run}",
        f"--train.batch_size={batch}",
        *TINY,
        *extra,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def curve(run: Path) -> list[tuple[int, float, float, str]]:
    with open(run / "logs" / "training_metrics.csv", newline="") as f:
        return [
            (int(r["step"]), float(r["loss"]), float(r["grad_norm"]), r["val_loss"])
            for r in csv.DictReader(f)
        ]


def assert_same_curve(a, b, tol=1e-5):
    assert [r[0] for r in a] == [r[0] for r in b]
    for (step, loss_a, norm_a, val_a), (_, loss_b, norm_b, val_b) in zip(a, b):
        assert abs(loss_a - loss_b) <= tol, (step, loss_a, loss_b)
        assert abs(norm_a - norm_b) <= 10 * tol, (step, norm_a, norm_b)
        assert (val_a == "") == (val_b == "")
        if val_a:
            assert abs(float(val_a) - float(val_b)) <= tol


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "stories"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmforge",
            "prepare",
            "--builtin",
            "stories",
            "--size-mb",
            "0.3",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    run = tmp_path_factory.mktemp("one") / "run"
    result = train(0, data, run, "--train.max_steps=20", batch=8)
    assert result.returncode == 0, result.stderr
    return curve(run)


def test_torchrun_with_one_process_joins_the_group_and_matches_a_plain_run(
    data, reference, tmp_path
):
    run = tmp_path / "run"
    result = train(1, data, run, "--train.max_steps=20", batch=8)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ddp on 1 process (gloo)" in result.stdout
    assert_same_curve(curve(run), reference)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_with_the_same_global_batch(data, reference, tmp_path, strategy):
    run = tmp_path / "run"
    result = train(2, data, run, "--train.max_steps=20", f"--train.distributed={strategy}", batch=4)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_curve(curve(run), reference)
    assert f"{strategy} on 2 processes (gloo)" in (run / "logs" / "training.log").read_text()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_process_checkpoint_resumes_in_one_process(data, reference, tmp_path, strategy):
    run = tmp_path / "run"
    first = train(
        2,
        data,
        run,
        "--train.max_steps=20",
        "--train.save_every=10",
        f"--train.distributed={strategy}",
        batch=4,
    )
    assert first.returncode == 0, first.stderr[-3000:]
    for path in (run / "checkpoints").glob("step_20.*"):
        path.unlink()  # as if the 2-process run had stopped after step 10
    (run / "checkpoints" / "final_model.pt").unlink()
    second = train(0, data, run, "--train.max_steps=20", "--train.save_every=10", batch=8)
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stdout and "step_10.pt" in second.stdout
    assert_same_curve(curve(run), reference)


def test_sigterm_to_the_torchrun_group_saves_once_and_resumes(data, reference, tmp_path):
    run = tmp_path / "run"
    cmd = [
        *torchrun(2),
        "train",
        f"--data.dir={data}",
        f"--run.dir={run}",
        "--train.batch_size=4",
        *TINY,
        "--train.max_steps=20",
        "--train.save_every=1000",
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    metrics = run / "logs" / "training_metrics.csv"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) > 5:
            os.killpg(proc.pid, signal.SIGTERM)
            break
        time.sleep(0.005)
    proc.communicate(timeout=120)
    time.sleep(0.5)
    alive = subprocess.run(["pgrep", "-f", str(run)], capture_output=True, text=True).stdout
    assert not alive.strip(), "every process must exit"
    steps = list((run / "checkpoints").glob("step_*.pt"))
    assert len(steps) == 1, steps
    resumed = train(2, data, run, "--train.max_steps=20", "--train.save_every=1000", batch=4)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_curve(curve(run), reference)


def sft(n: int, init: Path, data: Path, run: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [*torchrun(n), "sft", "--init-from", str(init), f"--run.dir={run}",
           f"--sft.data=stories-qa:{data / 'qa_train.jsonl'}", "--sft.weights=0.05",
           "--train.max_steps=12", "--train.eval_every=6", "--train.eval_batches=4",
           "--train.sample_every=0", "--log.plot_every=0", "--train.warmup_passes=0",
           "--log.log_every=1", "--train.save_every_minutes=0", "--train.threads=1",
           "--schedule.warmup_steps=2", "--optim.lr=1e-3", *extra]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_sft_under_torchrun_trains_once_and_matches_one_process(data, tmp_path, strategy):
    """Two processes with batch B train one run (rank 0 alone logs and writes) whose loss curve
    is that of one process with twice the micro-batches."""
    init = tmp_path / "pre"
    assert (
        train(0, data, init, "--train.max_steps=10", "--model.context=256", batch=8).returncode == 0
    )
    one, two = tmp_path / "one", tmp_path / "two"
    alone = sft(0, init, data, one, "--train.batch_size=4", "--train.grad_accum=2")
    assert alone.returncode == 0, alone.stderr[-3000:]
    pair = sft(2, init, data, two, "--train.batch_size=4", f"--train.distributed={strategy}")
    assert pair.returncode == 0, pair.stderr[-3000:]
    steps = [line for line in pair.stdout.splitlines() if line.startswith("step ")]
    assert len(steps) == 12, pair.stdout[-3000:]  # every step logged once: by rank 0 alone
    assert f"{strategy} on 2 processes (gloo)" in (two / "logs" / "training.log").read_text()
    assert_same_curve(curve(two), curve(one), tol=2e-5)
