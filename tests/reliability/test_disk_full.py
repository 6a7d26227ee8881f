"""A full disk at every write of the tool: one line naming the file and what to do, exit 2, every
earlier file intact, and the run resumable once there is room again.

Each case puts the folder that fills up on a small tmpfs of its own (root can mount one; where the
machine does not allow it, the case runs with a file-size limit instead, which makes the same
writes fail with EFBIG)."""

from __future__ import annotations

import resource
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from helpers import TINY, checksums, lmforge_subprocess, make_tiny_run, one_error_line

pytestmark = pytest.mark.slow


class SmallDisk:
    """Folders on their own tmpfs, unmounted at the end."""

    def __init__(self) -> None:
        self.mounts: list[Path] = []

    def make(self, path: Path, kib: int) -> Path | None:
        path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(path)],
                              capture_output=True)  # fmt: skip
        if done.returncode != 0:
            return None
        self.mounts.append(path)
        return path

    def grow(self, path: Path, kib: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={kib}k", str(path)], check=True)

    def fill(self, path: Path) -> None:
        """Use up the rest of the disk."""
        try:
            with open(path / "filler", "wb", buffering=0) as f:
                while True:
                    f.write(b"\0" * 4096)
        except OSError:
            pass

    def close(self) -> None:
        for path in reversed(self.mounts):
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def disk():
    d = SmallDisk()
    yield d
    d.close()


def limit_files(kib: int):
    def apply():  # the fallback: writes past `kib` fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (kib * 1024, kib * 1024))

    return apply


def disk_message(line: str) -> bool:
    return "disk is full" in line or "larger than this file system" in line or "limit" in line


def train(data: Path, run: Path, *extra: str, **kw) -> subprocess.CompletedProcess:
    return lmforge_subprocess("train", f"--data.dir={data}", f"--run.dir={run}", *TINY, *extra,
                              **kw)  # fmt: skip


def test_a_checkpoint_on_a_full_disk(stories, pretrained, tmp_path, disk):
    run = tmp_path / "run"
    used = sum(p.stat().st_size for p in pretrained.rglob("*") if p.is_file()) // 1024
    mounted = disk.make(run, used + 200)  # room for the logs, not for another checkpoint
    extra = {} if mounted else {"preexec_fn": limit_files(64)}
    shutil.copytree(pretrained, run, dirs_exist_ok=True)
    kept = checksums(run / "checkpoints")
    result = train(stories, run, "--train.max_steps=30", "--train.save_every=5", **extra)
    line = one_error_line(result.stderr)
    print(f"full disk, checkpoint: {line}")  # what the user sees (-s)
    assert result.returncode == 2 and "could not write checkpoint" in line and disk_message(line)
    assert "earlier checkpoints are intact" in line
    after = checksums(run / "checkpoints")
    assert {k: after.get(k) for k in kept} == kept  # every earlier checkpoint as it was
    if mounted:
        disk.grow(run, 8192)
        resumed = train(stories, run, "--train.max_steps=30", "--train.save_every=5")
        assert resumed.returncode == 0, resumed.stderr
        assert "resumed from" in resumed.stdout


def test_a_metrics_row_on_a_full_disk(stories, tmp_path, disk):
    run = tmp_path / "run"
    logs = disk.make(run / "logs", 48)  # some rows fit, then the disk is full
    if logs is None:
        pytest.skip("cannot mount a tmpfs here: the CSV case needs a disk of its own")
    result = train(stories, run, "--train.max_steps=400", "--train.save_every=5")
    line = one_error_line(result.stderr)
    print(f"full disk, metrics row: {line}")  # what the user sees (-s)
    assert result.returncode == 2 and "/logs/" in line and disk_message(line)
    assert list((run / "checkpoints").glob("step_*.pt"))  # what was saved before is there
    disk.grow(logs, 4096)
    resumed = train(stories, run, "--train.max_steps=30", "--train.save_every=5")
    assert resumed.returncode == 0, resumed.stderr


def test_the_report_on_a_full_disk_is_a_warning_after_training(stories, tmp_path, disk):
    run = tmp_path / "run"
    plots = disk.make(run / "training_plots", 4)
    if plots is None:
        pytest.skip("cannot mount a tmpfs here: the report case needs a disk of its own")
    result = train(stories, run, "--train.max_steps=12")
    assert result.returncode == 0, result.stderr  # training is complete: not a failure
    assert "warning: the report was not written" in result.stdout
    print(
        "full disk, report after training:",
        next(x for x in result.stdout.splitlines() if "report was not written" in x),
    )
    assert (run / "checkpoints" / "final_model.pt").is_file()
    report = lmforge_subprocess("report", run)
    line = one_error_line(report.stderr)
    print(f"full disk, lmforge report: {line}")  # what the user sees (-s)
    assert report.returncode == 2 and "training_plots" in line and disk_message(line)


def test_config_yaml_on_a_full_disk(stories, tmp_path, disk):
    run = tmp_path / "run"
    mounted = disk.make(run, 16)
    if mounted is None:
        pytest.skip("cannot mount a tmpfs here")
    disk.fill(run)
    before = checksums(run)
    result = train(stories, run, "--train.max_steps=5")
    line = one_error_line(result.stderr)
    print(f"full disk, config.yaml: {line}")  # what the user sees (-s)
    assert result.returncode == 2 and "config.yaml" in line and disk_message(line)
    assert checksums(run) == before  # nothing left behind


def test_prepare_on_a_full_disk(tmp_path, disk):
    out_parent = disk.make(tmp_path / "small", 64)
    extra = {} if out_parent else {"preexec_fn": limit_files(64)}
    out_parent = out_parent or tmp_path / "small"
    result = lmforge_subprocess("prepare", "--builtin", "stories", "--size-mb", "0.3",
                                "--out", out_parent / "stories", **extra)  # fmt: skip
    line = one_error_line(result.stderr)
    print(f"full disk, prepare: {line}")  # what the user sees (-s)
    assert result.returncode == 2 and "stories" in line and disk_message(line)
    assert sorted(p.name for p in out_parent.iterdir()) == []  # no half folder, no staging


def test_export_on_a_full_disk(tmp_path, disk):
    from lmforge.tokenizers import ByteTokenizer

    run = make_tiny_run(tmp_path / "run", tokenizer=ByteTokenizer())  # byte: GGUF carries it
    out_parent = disk.make(tmp_path / "small", 32)
    extra = {} if out_parent else {"preexec_fn": limit_files(32)}
    out_parent = out_parent or tmp_path / "small"
    for fmt, name in (("hf", "hf"), ("gguf", "model.gguf")):
        result = lmforge_subprocess("export", run, "--format", fmt,
                                    "--out", out_parent / name, **extra)  # fmt: skip
        line = one_error_line(result.stderr)
        print(f"full disk, export {fmt}: {line}")  # what the user sees (-s)
        assert result.returncode == 2 and name in line and disk_message(line), line
    assert sorted(p.name for p in out_parent.iterdir()) == []
