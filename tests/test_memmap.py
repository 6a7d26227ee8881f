"""TokenBatches: resumable positions, per-rank batches, epoch coverage; read_meta checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.data.memmap import TokenBatches, read_meta
from lmforge.errors import UserError


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    """A prepared-looking folder: 10,000 uint16 tokens of train, 500 of val."""
    rng = np.random.default_rng(0)
    rng.integers(0, 60_000, 10_000, dtype=np.uint16).tofile(tmp_path / "train.bin")
    rng.integers(0, 60_000, 500, dtype=np.uint16).tofile(tmp_path / "val.bin")
    meta = {"dtype": "uint16", "train_tokens": 10_000, "val_tokens": 500, "vocab_size": 60_000,
            "tokenizer": {"name": "gpt2"}}  # fmt: skip
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    return tmp_path


def test_resumed_run_reads_the_same_batches(data_dir: Path) -> None:
    path = data_dir / "train.bin"
    uninterrupted = TokenBatches(path, context=32, batch_size=4, seed=7)
    for step in range(1000):
        uninterrupted.get_batch(step, 0)
    x_run, y_run = uninterrupted.get_batch(1000, 0)
    x_new, y_new = TokenBatches(path, context=32, batch_size=4, seed=7).get_batch(1000, 0)
    assert torch.equal(x_run, x_new) and torch.equal(y_run, y_new)
    # the same tokens whether read from the file or from an array in memory
    array = np.fromfile(path, dtype=np.uint16)
    x_arr, _ = TokenBatches(array, context=32, batch_size=4, seed=7).get_batch(1000, 0)
    assert torch.equal(x_arr, x_new)


def test_batches_are_shifted_windows(data_dir: Path) -> None:
    batches = TokenBatches(data_dir / "train.bin", context=16, batch_size=8, seed=0)
    x, y = batches.get_batch(3, 1)
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    data = np.fromfile(data_dir / "train.bin", dtype=np.uint16).astype(np.int64)
    for row, start in zip(x, batches.offsets(3, 1)):
        assert row.tolist() == data[start : start + 16].tolist()
    assert batches.offsets(3, 1).max() <= len(data) - 17


def test_ranks_steps_and_seeds_differ(data_dir: Path) -> None:
    path = data_dir / "train.bin"

    def first(seed: int = 0, rank: int = 0, step: int = 5, micro: int = 0) -> torch.Tensor:
        batches = TokenBatches(path, 32, 4, seed=seed, rank=rank, world_size=2)
        return batches.get_batch(step, micro)[0]

    reference = first()
    for other in (first(rank=1), first(step=6), first(micro=1), first(seed=1)):
        assert not torch.equal(reference, other)


@pytest.mark.parametrize("num_tokens", [24 * 8 + 1, 25 * 8 + 1, 25 * 8 + 5])
def test_epoch_mode_covers_each_window_once(num_tokens: int) -> None:
    data = np.arange(num_tokens, dtype=np.int64)
    world, accum, batch = 2, 2, 3  # 12 sequences per step

    def loader(rank: int) -> TokenBatches:
        return TokenBatches(
            data,
            context=8,
            batch_size=batch,
            seed=1,
            rank=rank,
            world_size=world,
            mode="epoch",
            grad_accum=accum,
        )

    loaders = [loader(rank) for rank in range(world)]
    windows = loaders[0].windows_per_epoch
    assert windows == (num_tokens - 9) // 8 + 1
    steps = 2 * loaders[0].batches_per_epoch + 1
    # global order: step, micro-step, rank, row
    starts = [
        int(start)
        for step in range(steps)
        for micro in range(accum)
        for rank in range(world)
        for start in loaders[rank].get_batch(step, micro)[0][:, 0]
    ]
    all_windows = list(range(0, windows * 8, 8))
    assert sorted(starts[:windows]) == all_windows  # epoch 0: every window exactly once
    assert sorted(starts[windows : 2 * windows]) == all_windows  # epoch 1 too
    assert starts[:windows] != starts[windows : 2 * windows]  # reshuffled
    assert loaders[0].epoch_of(0) == 0
    for step in range(steps):
        assert loaders[0].epoch_of(step) == step * 12 // windows
    # a fresh loader at a later step reads what the running one read (pure function of step)
    assert torch.equal(loader(1).get_batch(3, 1)[0], loaders[1].get_batch(3, 1)[0])


def test_epoch_stride(data_dir: Path) -> None:
    batches = TokenBatches(
        data_dir / "train.bin", context=32, batch_size=4, seed=0, mode="epoch", stride=16
    )
    assert batches.windows_per_epoch == (10_000 - 33) // 16 + 1
    assert all(o % 16 == 0 for o in batches.offsets(0))


def test_read_meta(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    assert read_meta(data_dir)["train_tokens"] == 10_000
    with pytest.raises(UserError, match="not found; run lmforge prepare"):
        read_meta(data_dir / "missing")
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(UserError, match="meta.json not found"):
        read_meta(empty)
    with open(data_dir / "train.bin", "ab") as f:
        f.write(b"\x00")  # a file that does not match meta.json
    with pytest.raises(UserError, match="incomplete or changed"):
        read_meta(data_dir)


def test_too_short_and_bad_mode(data_dir: Path) -> None:
    with pytest.raises(UserError, match="fewer than one window"):
        TokenBatches(np.arange(10), context=16, batch_size=1, seed=0)
    with pytest.raises(UserError, match="batch mode"):
        TokenBatches(data_dir / "train.bin", context=16, batch_size=1, seed=0, mode="sequential")


def _documents(lengths: list[int], eot: int = 0) -> np.ndarray:
    """Documents of the given lengths (tokens 1..9, never eot), each followed by an eot."""
    rng = np.random.default_rng(1)
    parts = [np.append(rng.integers(1, 10, n), eot) for n in lengths]
    return np.concatenate(parts).astype(np.uint16)


def test_doc_windows_start_where_documents_start() -> None:
    lengths = [5, 12, 3, 40, 7, 9, 25, 4, 11, 30]  # 40 and 30 are longer than the window
    data = _documents(lengths)
    context = 16
    batches = TokenBatches(data, context, batch_size=64, seed=3, mode="doc", eot_id=0)
    doc_start = np.concatenate([[0], np.flatnonzero(data == 0)])  # window 0 and every eot
    expected = set()
    for start, end in zip(doc_start, np.append(doc_start[1:], len(data))):
        expected.update(range(int(start), int(end), context))  # long ones: every 16 tokens
    expected = {s for s in expected if s <= len(data) - context - 1}
    assert set(batches.doc_starts.tolist()) == expected
    seen = set()
    for step in range(20):
        starts = batches.offsets(step)
        seen.update(starts.tolist())
        x, y = batches.get_batch(step)
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row, start in zip(x, starts):
            assert row.tolist() == data[start : start + context].astype(np.int64).tolist()
    assert seen == expected  # 1,280 draws reach every start
    # a pure function of (seed, step, micro_step), like the random mode
    again = TokenBatches(data, context, batch_size=64, seed=3, mode="doc", eot_id=0)
    assert torch.equal(again.get_batch(7, 1)[0], batches.get_batch(7, 1)[0])
    assert not torch.equal(again.get_batch(7, 0)[0], batches.get_batch(7, 1)[0])


def test_doc_validation_scores_the_first_document_only(data_dir: Path) -> None:
    data = _documents([5, 12, 3, 6, 7, 9, 25, 4, 11, 8, 10, 6])
    batches = TokenBatches(data, 16, 32, seed=0, mode="doc", eot_id=0, first_doc_only=True)
    x, y = batches.get_batch(0)
    for start, row in zip(batches.offsets(0), y):
        first_end = int(np.flatnonzero(data[start + 1 :] == 0)[0])  # its eot, as a target index
        kept = (row != -100).nonzero().flatten().tolist()
        assert kept == list(range(min(first_end + 1, 16)))  # the document and its eot
    # doc mode finds the eot id in meta.json beside the file
    meta = json.loads((data_dir / "meta.json").read_text())
    (data_dir / "meta.json").write_text(json.dumps({**meta, "eot_id": 7}))
    assert TokenBatches(data_dir / "train.bin", 16, 2, seed=0, mode="doc").eot_id == 7
    (data_dir / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="eot_id"):
        TokenBatches(data_dir / "train.bin", 16, 2, seed=0, mode="doc")
