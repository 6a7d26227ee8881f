"""Checkpoints are never half-written and never silently wrong: verified against their record,
foreign files named, a damaged best.pt skipped for the next valid checkpoint of the run."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from lmforge.train import checkpoint as ckpt
from lmforge.train.checkpoint import CheckpointError


def state(value: float = 1.0) -> dict:
    return {"model": {"w": torch.full((4, 4), value)}, "step": int(value)}


def test_save_writes_record_with_checksum_and_load_verifies(tmp_path):
    path = ckpt.save_checkpoint(tmp_path / "step_1.pt", state(), {"step": 1})
    record = json.loads((tmp_path / "step_1.json").read_text())
    assert record["sha256"] == ckpt.sha256_of(path) and record["step"] == 1
    assert torch.equal(ckpt.load_checkpoint(path)["model"]["w"], torch.ones(4, 4))
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary left


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_file_is_refused(tmp_path, damage):
    path = ckpt.save_checkpoint(tmp_path / "step_1.pt", state())
    blob = bytearray(path.read_bytes())
    if damage == "flip":
        blob[len(blob) // 2] ^= 1
    else:
        blob = blob[: len(blob) // 2]
    path.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="corrupt"):
        ckpt.load_checkpoint(path)


def test_a_missing_record_is_refused_not_skipped(tmp_path):
    path = ckpt.save_checkpoint(tmp_path / "best.pt", state())
    (tmp_path / "best.json").unlink()
    with pytest.raises(CheckpointError, match="no checksum record"):
        ckpt.load_checkpoint(path)


def test_kill_between_record_and_rename_leaves_a_valid_file(tmp_path):
    """The record of a replaced best.pt names the new checksum and the one it replaces: the old
    file, still in place after a kill before the rename, verifies."""
    path = ckpt.save_checkpoint(tmp_path / "best.pt", state(1.0))
    old = path.read_bytes()
    ckpt.save_checkpoint(path, state(2.0))
    record = json.loads((tmp_path / "best.json").read_text())
    assert record["replaces_sha256"] != record["sha256"]
    path.write_bytes(old)  # as if the rename had not happened
    assert torch.equal(ckpt.load_checkpoint(path)["model"]["w"], torch.ones(4, 4))


def test_foreign_checkpoints_are_named(tmp_path):
    nanogpt = tmp_path / "ckpt.pt"
    torch.save({"model": {"w": torch.ones(1)}, "model_args": {"n_layer": 1}, "iter_num": 5,
                "optimizer": {}, "best_val_loss": 1.0, "config": {}}, nanogpt)  # fmt: skip
    with pytest.raises(CheckpointError, match="nanoGPT checkpoint"):
        ckpt.load_checkpoint(nanogpt)
    plain = tmp_path / "weights.pt"
    torch.save({"w": torch.ones(2)}, plain)
    with pytest.raises(CheckpointError, match="plain state dict"):
        ckpt.load_checkpoint(plain)
    code = tmp_path / "code.pt"
    with open(code, "wb") as f:
        pickle.dump({"model": object()}, f)
    with pytest.raises(CheckpointError, match="would run code|cannot be read"):
        ckpt.load_checkpoint(code)


def test_a_run_folder_falls_back_to_the_next_valid_checkpoint(tmp_path, capsys):
    folder = tmp_path / "run" / "checkpoints"
    ckpt.save_checkpoint(folder / "step_5.pt", state(5.0))
    ckpt.save_checkpoint(folder / "best.pt", state(3.0))
    (folder / "best.pt").write_bytes(b"damaged")
    path, loaded = ckpt.load_run_checkpoint(tmp_path / "run")
    assert path.name == "step_5.pt" and loaded["step"] == 5
    notice = capsys.readouterr().err.strip().splitlines()
    assert len(notice) == 1 and "best.pt" in notice[0] and "using the next checkpoint" in notice[0]


def test_newest_valid_reports_and_skips_a_corrupt_newest(tmp_path):
    for step in (1, 2):
        ckpt.save_checkpoint(tmp_path / f"step_{step}.pt", state(float(step)))
    (tmp_path / "step_2.pt").write_bytes(b"x")
    seen = []
    path, loaded = ckpt.newest_valid(tmp_path, report=seen.append)
    assert path.name == "step_1.pt" and len(seen) == 1 and "step_2.pt" in seen[0]
    assert (tmp_path / "step_2.pt").read_bytes() == b"x"  # left in place


def test_prune_keeps_the_newest(tmp_path):
    for step in range(1, 6):
        ckpt.save_checkpoint(tmp_path / f"step_{step}.pt", state(float(step)))
    ckpt.prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step_4.json", "step_4.pt", "step_5.json", "step_5.pt"
    ]  # fmt: skip
