"""TextDataset, collate and create_dataloaders: the seed pipeline's data path (seeds/004)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmforge.data.text import (
    EpochShuffleSampler,
    TextDataset,
    collate,
    create_dataloaders,
    default_stride,
    pad_id_of,
    read_documents,
    window_starts,
)
from lmforge.errors import UserError
from lmforge.tokenizers import get_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "text"
TRAIN, VAL = FIXTURES / "train.txt", FIXTURES / "val.txt"


class DigitTokenizer:
    """Text "0 1 2" -> ids [0, 1, 2]; end-of-text is id 9 (so one 0..8 document gives 0..9)."""

    name, vocab_size, eot_id = "digits", 10, 9

    def encode(self, text: str) -> list[int]:
        return [int(word) for word in text.split()]


# ------------------------------------------------------------------------ sliding window
def test_seed_sliding_window_example(tmp_path: Path) -> None:
    # Seed: tokens [0..9], max_length=5, stride=3 -> chunks [0..4], [3..7], [6..9].
    path = tmp_path / "digits.txt"
    path.write_text("0 1 2 3 4 5 6 7 8\n", encoding="utf-8")
    dataset = TextDataset(path, DigitTokenizer(), max_length=5, stride=3)
    assert dataset.tokens.tolist() == list(range(10))
    assert dataset.starts == [0, 3, 6]
    assert len(dataset) == 3
    assert dataset[0]["input_ids"].tolist() == [0, 1, 2, 3, 4]
    assert dataset[1]["input_ids"].tolist() == [3, 4, 5, 6, 7]
    # The last window is the seed's chunk 3, [6, 7, 8, 9]: it is kept short (collate pads it).
    assert dataset.window(2).tolist() == [6, 7, 8, 9]
    assert dataset[2]["input_ids"].tolist() == [6, 7, 8]
    # Labels are the next tokens, aligned with the inputs (labels[i] is the target of input i).
    assert dataset[0]["labels"].tolist() == [1, 2, 3, 4, 5]
    assert dataset[1]["labels"].tolist() == [4, 5, 6, 7, 8]
    assert dataset[2]["labels"].tolist() == [7, 8, 9]
    sample = dataset[0]
    assert set(sample) == {"input_ids", "labels"}
    assert sample["input_ids"].dtype == torch.long and sample["labels"].dtype == torch.long


@pytest.mark.parametrize(
    "n, max_length, stride, expected",
    [
        (10, 5, 3, [0, 3, 6]),
        (10, 5, None, [0, 5]),  # default stride = max_length: windows [0..5] and [5..9]
        (12, 5, None, [0, 5, 10]),  # token 11 still needs predicting: a 2-token last window
        (13, 5, None, [0, 5, 10]),  # [10, 11, 12]: a short last window
        (11, 5, None, [0, 5]),  # [5..10] is exactly full; no 1-token window after it
        (3, 5, 1, [0]),  # shorter than one window
        (10, 5, 8, [0, 8]),  # stride > max_length skips tokens 6 and 7
        (2, 1, 1, [0]),
    ],
)
def test_window_starts(n: int, max_length: int, stride: int | None, expected: list[int]) -> None:
    assert window_starts(n, max_length, stride or max_length) == expected


def test_default_stride_overlaps_as_the_document() -> None:
    # The document: stride 256 at its default max_length 512; never more than half the window.
    assert [default_stride(n) for n in (512, 1024, 128, 32, 1)] == [256, 256, 64, 16, 1]
    dataset = TextDataset.from_tokens(range(100), max_length=16)
    assert dataset.stride == 8 and dataset.starts[:3] == [0, 8, 16]
    inputs = [dataset[i]["input_ids"].tolist() for i in range(len(dataset))]
    assert inputs[1][:8] == inputs[0][8:]  # each window repeats half of the one before
    covered = {token for window in inputs for token in window}
    assert covered == set(range(99))  # nothing skipped
    tok = get_tokenizer("word", read_documents(TRAIN))
    assert TextDataset(TRAIN, tok).stride == 256  # the document's TextDataset(file, tok)


def test_stride_max_length_uses_every_token_once() -> None:
    dataset = TextDataset.from_tokens(range(100), max_length=16, stride=16)
    inputs = torch.cat([dataset[i]["input_ids"] for i in range(len(dataset))]).tolist()
    labels = torch.cat([dataset[i]["labels"] for i in range(len(dataset))]).tolist()
    assert inputs == list(range(99))  # no overlap, nothing skipped
    assert labels == list(range(1, 100))
    assert all(len(dataset[i]["input_ids"]) == 16 for i in range(len(dataset) - 1))


def test_documents_end_with_eot() -> None:
    tok = get_tokenizer("word", read_documents(TRAIN))
    dataset = TextDataset(TRAIN, tok, max_length=32)
    assert dataset.documents == 12
    assert int((dataset.tokens == tok.eot_id).sum()) == 12
    assert int(dataset.tokens[-1]) == tok.eot_id
    first_doc = read_documents(TRAIN)[0]
    assert tok.decode(dataset.tokens[: len(tok.encode(first_doc))].tolist()) == first_doc
    assert repr(dataset).startswith("TextDataset(")


def test_index_out_of_range() -> None:
    dataset = TextDataset.from_tokens(range(10), max_length=5, stride=3)
    assert dataset[-1]["input_ids"].tolist() == [6, 7, 8]
    with pytest.raises(IndexError):
        dataset[3]


# ------------------------------------------------------------------------ jsonl
def test_jsonl_text_field_and_other_field() -> None:
    assert read_documents(FIXTURES / "docs.jsonl") == ["short 0", "short 1", "short 2", "short 3"]
    bodies = read_documents(FIXTURES / "docs.jsonl", field="body")
    assert len(bodies) == 4 and all(b.startswith("The ") for b in bodies)
    tok = get_tokenizer("char", bodies)
    dataset = TextDataset(FIXTURES / "docs.jsonl", tok, max_length=16, field="body")
    assert dataset.documents == 4
    assert len(dataset.tokens) == sum(len(b) for b in bodies) + 4


# ------------------------------------------------------------------------ bad inputs
def test_missing_file() -> None:
    with pytest.raises(UserError, match="not found"):
        TextDataset(FIXTURES / "nope.txt", DigitTokenizer())


def test_empty_file() -> None:
    with pytest.raises(UserError, match="empty.txt holds no text"):
        TextDataset(FIXTURES / "empty.txt", DigitTokenizer())


def test_bad_jsonl_line_names_file_and_line() -> None:
    with pytest.raises(UserError, match=r"bad\.jsonl:2: not valid JSON"):
        TextDataset(FIXTURES / "bad.jsonl", DigitTokenizer())
    with pytest.raises(UserError, match=r'no_field\.jsonl:2: no "text" field'):
        read_documents(FIXTURES / "no_field.jsonl")
    with pytest.raises(UserError, match=r'docs\.jsonl:1: "id" is int, not text'):
        read_documents(FIXTURES / "docs.jsonl", field="id")


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8 at byte offset 3"):
        read_documents(path)


def test_too_short_and_bad_sizes(tmp_path: Path) -> None:
    path = tmp_path / "one.txt"
    path.write_text("", encoding="utf-8")
    with pytest.raises(UserError, match="holds no text"):
        TextDataset(path, DigitTokenizer())
    with pytest.raises(UserError, match="max_length"):
        TextDataset(TRAIN, DigitTokenizer(), max_length=0)
    with pytest.raises(UserError, match="stride"):
        TextDataset(TRAIN, DigitTokenizer(), max_length=4, stride=0)


# ------------------------------------------------------------------------ collate
def test_collate_matches_seed_table() -> None:
    batch = collate([[1, 2, 3, 4], [1, 2, 3, 4, 5, 6, 7]], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 0, 0, 0], [1, 2, 3, 4, 5, 6, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[2, 3, 4, -100, -100, -100, -100], [2, 3, 4, 5, 6, 7, -100]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_collate_dataset_samples_keeps_aligned_labels() -> None:
    dataset = TextDataset.from_tokens(range(10), max_length=5, stride=3)
    batch = collate([dataset[2], dataset[0]], pad_id=42)
    assert batch["input_ids"].tolist() == [[6, 7, 8, 42, 42], [0, 1, 2, 3, 4]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[7, 8, 9, -100, -100], [1, 2, 3, 4, 5]]


def test_pad_id_of() -> None:
    word = get_tokenizer("word", ["a b"])
    assert pad_id_of(word) == 0  # the seed's <PAD> = 0
    char = get_tokenizer("char", ["ab"])
    assert pad_id_of(char) == char.eot_id


# ------------------------------------------------------------------------ create_dataloaders
def test_create_dataloaders_seed_usage() -> None:
    train_loader, val_loader, tokenizer = create_dataloaders(
        train_file=TRAIN, val_file=VAL, batch_size=8, max_length=32
    )
    assert tokenizer.name == "word" and tokenizer.vocab_size > 10
    batch = next(iter(train_loader))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == batch["labels"].shape == (8, 32)
    assert val_loader is not None and len(val_loader) >= 1
    val_batch = next(iter(val_loader))
    assert val_batch["input_ids"].shape[1] <= 32
    _, no_val, _ = create_dataloaders(TRAIN, batch_size=4, max_length=32)
    assert no_val is None


def test_create_dataloaders_tokenizer_instance_and_names() -> None:
    tok = get_tokenizer("byte")
    _, _, same = create_dataloaders(TRAIN, tokenizer=tok, max_length=64)
    assert same is tok
    _, _, char = create_dataloaders(TRAIN, tokenizer="char", max_length=64)
    assert char.name == "char"
    with pytest.raises(UserError, match="unknown tokenizer"):
        create_dataloaders(TRAIN, tokenizer="sentencepiece")
    with pytest.raises(UserError, match="batch_size"):
        create_dataloaders(TRAIN, batch_size=0)


def _order(loader) -> list[list[int]]:
    return [batch["input_ids"][:, 0].tolist() for batch in loader]


def test_shuffle_is_seeded_and_replayable() -> None:
    a, _, _ = create_dataloaders(TRAIN, batch_size=4, max_length=16, seed=3)
    b, _, _ = create_dataloaders(TRAIN, batch_size=4, max_length=16, seed=3)
    first_a, second_a = _order(a), _order(a)
    assert first_a == _order(b)  # same seed, same order
    assert second_a == _order(b)  # ...epoch after epoch
    assert first_a != second_a  # a new order each epoch
    c, _, _ = create_dataloaders(TRAIN, batch_size=4, max_length=16, seed=4)
    assert _order(c) != first_a
    # A fresh loader told its epoch replays that epoch's order (what resuming needs).
    d, _, _ = create_dataloaders(TRAIN, batch_size=4, max_length=16, seed=3)
    assert isinstance(d.sampler, EpochShuffleSampler)
    d.sampler.set_epoch(1)
    assert _order(d) == second_a
    plain, _, _ = create_dataloaders(TRAIN, batch_size=4, max_length=16, shuffle=False)
    starts = [row for batch in _order(plain) for row in batch]
    dataset = plain.dataset
    assert starts == [int(dataset.tokens[s]) for s in dataset.starts]


def test_jsonl_loader_and_workers(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for doc in read_documents(TRAIN):
            f.write(json.dumps({"content": doc}) + "\n")
    loader, _, tok = create_dataloaders(
        path, batch_size=4, max_length=32, field="content", num_workers=1, shuffle=False
    )
    reference, _, _ = create_dataloaders(
        TRAIN, batch_size=4, max_length=32, tokenizer=tok, shuffle=False
    )
    for got, want in zip(loader, reference):
        assert torch.equal(got["input_ids"], want["input_ids"])
        assert torch.equal(got["labels"], want["labels"])
