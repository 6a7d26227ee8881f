"""`lmforge train` end to end on a tiny model: resume after SIGTERM and kill -9 gives the same
curve, corrupt checkpoints are skipped, keep-last, write errors, config errors."""

from __future__ import annotations

import csv
import hashlib
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import TINY, lmforge_subprocess, one_error_line

COMPARED = ("step", "tokens_seen", "loss", "lr", "grad_norm", "val_loss")


lmforge = lmforge_subprocess


@pytest.fixture(scope="module")
def data_dir(stories) -> Path:
    return stories


def rows(run: Path) -> list[dict[str, str]]:
    with open(run / "logs" / "training_metrics.csv", newline="") as f:
        return [{k: r[k] for k in COMPARED} for r in csv.DictReader(f)]


def train(data_dir: Path, run: Path, *extra: str, **kw) -> subprocess.CompletedProcess:
    return lmforge("train", f"--data.dir={data_dir}", f"--run.dir={run}", *TINY, *extra, **kw)


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory) -> list[dict[str, str]]:
    run = tmp_path_factory.mktemp("ref") / "run"
    result = train(data_dir, run, "--train.max_steps=60", "--train.save_every=10")
    assert result.returncode == 0, result.stderr
    assert (run / "checkpoints" / "final_model.pt").is_file()
    return rows(run)


def start_and_signal(
    data_dir: Path, run: Path, sig: int, after_step: int, *extra: str
) -> subprocess.Popen:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lmforge",
            "train",
            f"--data.dir={data_dir}",
            f"--run.dir={run}",
            *TINY,
            "--train.max_steps=60",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    csv_path = run / "logs" / "training_metrics.csv"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if csv_path.exists() and len(csv_path.read_text().splitlines()) > after_step:
            proc.send_signal(sig)
            break
        time.sleep(0.005)
    proc.wait(timeout=120)
    return proc


def test_sigterm_saves_and_resume_continues_the_same_curve(data_dir, reference, tmp_path):
    run = tmp_path / "run"
    proc = start_and_signal(data_dir, run, signal.SIGTERM, 15, "--train.save_every=1000")
    assert proc.returncode == 0, proc.stderr.read()
    steps = sorted(int(p.stem.split("_")[1]) for p in (run / "checkpoints").glob("step_*.pt"))
    assert len(steps) == 1 and 15 <= steps[0] < 60  # the checkpoint written on SIGTERM
    resumed = train(
        data_dir, run, "--train.max_steps=60", "--train.resume=auto", "--train.save_every=1000"
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    assert rows(run) == reference  # every row, before and after the interruption, bit for bit


def test_kill_9_loses_only_steps_since_last_checkpoint(data_dir, reference, tmp_path):
    run = tmp_path / "run"
    proc = start_and_signal(data_dir, run, signal.SIGKILL, 25, "--train.save_every=10")
    assert proc.returncode == -signal.SIGKILL
    resumed = train(data_dir, run, "--train.max_steps=60", "--train.save_every=10")
    assert resumed.returncode == 0, resumed.stderr
    assert rows(run) == reference


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_newest_checkpoint_is_reported_and_previous_used(data_dir, tmp_path, damage):
    run = tmp_path / "run"
    assert train(data_dir, run, "--train.max_steps=20", "--train.save_every=10").returncode == 0
    newest = run / "checkpoints" / "step_20.pt"
    blob = bytearray(newest.read_bytes())
    if damage == "truncate":
        blob = blob[: len(blob) // 2]
    else:
        blob[len(blob) // 2] ^= 0xFF
    newest.write_bytes(bytes(blob))
    bad = sha(newest)
    result = train(data_dir, run, "--train.max_steps=30", "--train.save_every=10")
    assert result.returncode == 0, result.stderr
    warnings = [
        line
        for line in result.stdout.splitlines()
        if "step_20.pt" in line
        and "corrupt" in line
        or "step_20.pt" in line
        and "cannot be read" in line
    ]
    assert len(warnings) == 1, result.stdout
    assert "resumed from" in result.stdout and "step_10.pt" in result.stdout
    kept = [p for p in (run / "checkpoints").iterdir() if p.suffix == ".pt" and sha(p) == bad]
    assert kept, "the damaged file must stay for the user to inspect"


def test_keep_last_keeps_three_plus_best_and_final(data_dir, tmp_path):
    run = tmp_path / "run"
    result = train(
        data_dir,
        run,
        "--train.max_steps=10",
        "--train.save_every=1",
        "--train.keep_last=3",
        "--train.eval_every=5",
    )
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in (run / "checkpoints").glob("*.pt"))
    assert names == ["best.pt", "final_model.pt", "step_10.pt", "step_8.pt", "step_9.pt"]


def test_write_error_is_one_line_and_keeps_earlier_checkpoints(data_dir, tmp_path):
    run = tmp_path / "run"
    assert train(data_dir, run, "--train.max_steps=10", "--train.save_every=10").returncode == 0
    before = {p.name: sha(p) for p in (run / "checkpoints").iterdir()}

    def small_files():  # files may not grow past 64 KiB: a checkpoint write fails (EFBIG)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    result = train(
        data_dir, run, "--train.max_steps=20", "--train.save_every=5", preexec_fn=small_files
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "could not write checkpoint" in result.stderr
    after = {p.name: sha(p) for p in (run / "checkpoints").iterdir() if not p.name.startswith(".")}
    assert {k: after.get(k) for k in before} == before


def test_resolved_config_is_written_and_reloads(data_dir, tmp_path):
    from lmforge.config import load_config

    run = tmp_path / "run"
    assert train(data_dir, run, "--train.max_steps=2").returncode == 0
    cfg = load_config(str(run / "config.yaml"))
    assert cfg.model.dim == 32 and cfg.train.max_steps == 2 and cfg.data.dir == str(data_dir)


def test_doc_batches_learn_and_resume_the_same_curve(data_dir, tmp_path):
    """data.mode=doc: windows start at stories; the loss falls; a resume continues the curve."""
    doc = ("--data.mode=doc", "--train.max_steps=30", "--train.save_every=10")
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert train(data_dir, whole, *doc).returncode == 0
    assert train(data_dir, cut, *doc[:2], "--train.max_steps=20", "--train.save_every=10",
                 "--schedule.decay_steps=30").returncode == 0  # fmt: skip
    expected = rows(whole)
    assert float(expected[-1]["val_loss"]) < float(expected[0]["loss"]) - 0.5
    assert train(data_dir, cut, *doc).returncode == 0
    assert rows(cut) == expected


def test_train_help_lists_every_key_with_default():
    import dataclasses

    from lmforge.config import SECTIONS

    result = lmforge("train", "--help")
    assert result.returncode == 0
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f"--{section}.{f.name}=" in result.stdout, f"{section}.{f.name} undocumented"


def test_non_finite_loss_stops_with_step_named(data_dir, tmp_path):
    run = tmp_path / "run"
    result = train(
        data_dir,
        run,
        "--train.max_steps=30",
        "--optim.lr=1e6",
        "--train.max_grad_norm=0",
        "--schedule.warmup_steps=0",
        "--train.save_every=2",
    )
    if result.returncode == 0:
        pytest.skip("this seed did not diverge at lr 1e6")  # guard: the point is the message
    assert result.returncode == 2 and "at step" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert any((run / "checkpoints").glob("step_*.pt"))


def test_phase_1_refuses_missing_data_dir(tmp_path):
    result = lmforge("train", f"--data.dir={tmp_path / 'nope'}", f"--run.dir={tmp_path / 'r'}")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1


def test_compile_on_a_cpu_without_a_cxx_compiler_is_one_line(data_dir, tmp_path):
    """torch.compile on a CPU builds C++ kernels: with no compiler found (inductor tries $CXX,
    else g++), one line before any step, not an inductor traceback in the first one."""
    run, env = tmp_path / "run", {**os.environ, "CXX": str(tmp_path / "no-such-g++")}
    result = train(data_dir, run, "--train.compile=true", "--train.device=cpu", env=env)
    assert result.returncode == 2, result.stderr
    line = one_error_line(result.stderr)
    assert "needs a C++ compiler" in line and "--train.compile=false" in line
    assert not list(run.glob("checkpoints/*.pt"))


def test_env_prints_versions():
    result = lmforge("env")
    assert (
        result.returncode == 0 and "torch" in result.stdout and "flash attention" in result.stdout
    )


def test_cpu_bf16_flag_is_read_from_cpuinfo(tmp_path, monkeypatch):
    import builtins

    from lmforge import device

    real_open = builtins.open

    def fake(flags: str):
        cpuinfo = tmp_path / f"cpuinfo-{len(flags)}"
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")

        def opener(path, *args, **kw):
            return real_open(cpuinfo if path == "/proc/cpuinfo" else path, *args, **kw)

        monkeypatch.setattr(builtins, "open", opener)

    fake("fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni")
    assert device.cpu_bf16_native() == "avx512_bf16"
    fake("fpu sse2 avx2 amx_bf16 avx512_bf16")
    assert device.cpu_bf16_native() == "amx_bf16"
    fake("fpu sse2 avx2 avx512f")
    assert device.cpu_bf16_native() is None
    assert "fp32 is fastest" in device.pick("cpu").reason
