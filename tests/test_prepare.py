"""`lmforge prepare`: token counts equal a direct encode, meta.json, splits, and bad input."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lmforge.data.prepare import (
    is_val_document,
    prepare,
    split_documents,
    token_dtype,
)
from lmforge.errors import UserError
from lmforge.tokenizers import get_tokenizer, load_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "data"
SHAKESPEARE = FIXTURES / "tiny_shakespeare.txt"


def shared_file(relative: str) -> Path:
    candidates = [Path(__file__).resolve().parents[2] / "shared" / "data"]
    if os.environ.get("LMFORGE_SHARED_DATA"):
        candidates.append(Path(os.environ["LMFORGE_SHARED_DATA"]))
    for root in candidates:
        if (root / relative).is_file():
            return root / relative
    pytest.skip(f"shared data file {relative} not present")


# ------------------------------------------------------------------------------------ helpers
def run_cli(*args: str) -> tuple[int, str, str]:
    """Run `lmforge prepare ARGS`: (exit status, stdout, stderr)."""
    done = subprocess.run(
        [sys.executable, "-m", "lmforge", "prepare", *args], capture_output=True, text=True
    )
    return done.returncode, done.stdout, done.stderr


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (empty when it does not exist)."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def read_bin(out: Path, split: str) -> np.ndarray:
    meta = json.loads((out / "meta.json").read_text())
    return np.fromfile(out / f"{split}.bin", dtype=meta["dtype"])


def split_on(ids: np.ndarray, eot: int) -> list[list[int]]:
    docs, start = [], 0
    for end in np.flatnonzero(ids == eot):
        docs.append(ids[start:end].tolist())
        start = end + 1
    assert start == len(ids), "every document ends with eot"
    return docs


def check_against_direct_encode(out: Path, documents: list[str], seed: int, fraction: float):
    """train/val hold exactly the documents' ids, each followed by eot, split by the seeded hash."""
    meta = json.loads((out / "meta.json").read_text())
    tok = load_tokenizer(out)
    encoded = tok.encode_batch(documents)
    train_docs = split_on(read_bin(out, "train"), tok.eot_id)
    val_docs = split_on(read_bin(out, "val"), tok.eot_id)
    assert meta["train_tokens"] + meta["val_tokens"] == sum(map(len, encoded)) + len(documents)
    assert meta["documents"] == len(documents) == len(train_docs) + len(val_docs)
    expected_val = [e for i, e in enumerate(encoded) if is_val_document(seed, i, fraction)]
    expected_train = [e for i, e in enumerate(encoded) if not is_val_document(seed, i, fraction)]
    if meta["val_tokens"] == sum(map(len, expected_val)) + len(expected_val):
        assert (train_docs, val_docs) == (expected_train, expected_val)
    else:  # documents were moved from the end of train to reach one val window
        moved = expected_train[len(train_docs) :]
        assert moved and train_docs == expected_train[: len(train_docs)]
        assert val_docs == expected_val + moved
    return meta


# ------------------------------------------------------------------------- correct outputs
@pytest.mark.parametrize("tokenizer", ["char", "gpt2", "byte", "word", "bpe:300"])
@pytest.mark.parametrize("workers", [1, 2])
def test_fixture_matches_direct_encode(tmp_path: Path, tokenizer: str, workers: int) -> None:
    out = tmp_path / "out"
    summary = prepare(
        [str(SHAKESPEARE)],
        out,
        tokenizer=tokenizer,
        val_fraction=0.3,
        seed=3,
        workers=workers,
        context=8,
    )
    documents = split_documents(SHAKESPEARE.read_text(encoding="utf-8"))
    assert len(documents) == 8
    meta = check_against_direct_encode(out, documents, seed=3, fraction=0.3)
    assert summary["out_dir"] == str(out.resolve())
    assert meta["tokenizer"]["name"] == tokenizer
    assert meta["dtype"] == "uint16"
    assert meta["words"] == sum(len(d.split()) for d in documents)
    assert meta["bytes"] == sum(len(d.encode()) for d in documents)
    assert meta["val_tokens"] >= 9 and meta["seed"] == 3 and meta["val_fraction"] == 0.3
    source = meta["sources"][0]
    assert source["bytes"] == SHAKESPEARE.stat().st_size
    assert source["sha256"] == hashlib.sha256(SHAKESPEARE.read_bytes()).hexdigest()
    expected_files = {"train.bin", "val.bin", "meta.json"}
    if tokenizer.startswith("bpe"):
        expected_files.add("tokenizer.json")
    if tokenizer in ("char", "word"):
        expected_files.add("vocab.json")
    assert {p.name for p in out.iterdir()} == expected_files
    assert not list(tmp_path.glob(".out.*")), "no temporary folder left behind"


@pytest.mark.parametrize("tokenizer", ["char", "gpt2"])
def test_tinyshakespeare(tmp_path: Path, tokenizer: str) -> None:
    path = shared_file("tinyshakespeare/input.txt")
    prepare([str(path)], tmp_path / "out", tokenizer=tokenizer)
    documents = split_documents(path.read_text(encoding="utf-8"))
    meta = check_against_direct_encode(tmp_path / "out", documents, seed=0, fraction=0.005)
    assert meta["documents"] == 7222
    assert meta["val_tokens"] >= 257
    assert meta["vocab_size"] == (67 if tokenizer == "char" else 50257)  # 65 chars + eot + unk
    assert meta["padded_vocab_size"] == (128 if tokenizer == "char" else 50304)


def test_val_gets_one_window_and_split_is_seeded(tmp_path: Path) -> None:
    # fraction 0: documents move from the end of train until val holds context + 1 tokens
    prepare([str(SHAKESPEARE)], tmp_path / "a", tokenizer="char", val_fraction=0.0, context=64)
    documents = split_documents(SHAKESPEARE.read_text(encoding="utf-8"))
    meta = check_against_direct_encode(tmp_path / "a", documents, seed=0, fraction=0.0)
    assert meta["val_tokens"] >= 65
    # same seed, same bytes; another seed, another split
    prepare([str(SHAKESPEARE)], tmp_path / "b", tokenizer="char", val_fraction=0.3, context=8)
    prepare([str(SHAKESPEARE)], tmp_path / "c", tokenizer="char", val_fraction=0.3, context=8)
    prepare(
        [str(SHAKESPEARE)], tmp_path / "d", tokenizer="char", val_fraction=0.3, context=8, seed=1
    )
    assert read_bin(tmp_path / "b", "val").tobytes() == read_bin(tmp_path / "c", "val").tobytes()
    assert read_bin(tmp_path / "b", "val").tobytes() != read_bin(tmp_path / "d", "val").tobytes()


def test_input_kinds(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [json.loads(line)["text"] for line in (FIXTURES / "docs.jsonl").open()]
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "a.jsonl").write_bytes((FIXTURES / "docs.jsonl").read_bytes())
    pq.write_table(pa.table({"body": texts}), folder / "b.parquet")
    (folder / "c.txt").write_text("one\n\n\n  \ntwo\r\nlines\r\n", encoding="utf-8")
    (folder / "ignored.csv").write_text("x,y\n")
    common = dict(tokenizer="byte", val_fraction=0.5, context=4)

    meta = prepare([str(folder / "sub" / "a.jsonl")], tmp_path / "j", **common)
    check_against_direct_encode(tmp_path / "j", texts, 0, 0.5)
    meta = prepare([str(folder / "b.parquet")], tmp_path / "p", field="body", **common)
    check_against_direct_encode(tmp_path / "p", texts, 0, 0.5)
    # folder (recursive, sorted: b.parquet, c.txt, sub/a.jsonl) needs the field of both
    with pytest.raises(UserError, match='no column "text"'):
        prepare([str(folder)], tmp_path / "f", **common)
    (folder / "b.parquet").unlink()
    meta = prepare([str(folder)], tmp_path / "f", **common)
    check_against_direct_encode(tmp_path / "f", ["one", "two\r\nlines", *texts], 0, 0.5)
    assert [Path(s["path"]).name for s in meta["sources"]] == ["c.txt", "a.jsonl"]
    meta = prepare([str(folder / "**" / "*.jsonl")], tmp_path / "g", **common)
    assert meta["documents"] == len(texts)


def test_txt_options(tmp_path: Path) -> None:
    stories = FIXTURES / "tinystories_mini.txt"
    common = dict(tokenizer="char", val_fraction=0.5, context=8)
    prepare([str(stories)], tmp_path / "sep", doc_separator="<|endoftext|>", **common)
    documents = split_documents(stories.read_text(encoding="utf-8"), "<|endoftext|>")
    assert len(documents) == 4 and "<|endoftext|>" not in "".join(documents)
    check_against_direct_encode(tmp_path / "sep", documents, 0, 0.5)
    dialogue = FIXTURES / "dialogues_mini.txt"
    prepare([str(stories), str(dialogue)], tmp_path / "per-file", doc_per_file=True, **common)
    documents = [stories.read_text(encoding="utf-8"), dialogue.read_text(encoding="utf-8")]
    check_against_direct_encode(tmp_path / "per-file", documents, 0, 0.5)


def test_errors_replace_and_overwrite(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_bytes("caf\u00e9 one\n\n".encode() + b"bad \xff byte here\n\nthird document\n")
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"bad.txt: not UTF-8 at byte offset 15 \(byte 0xff\)"):
        prepare([str(bad)], out, tokenizer="byte", context=4)
    assert not out.exists()
    meta = prepare([str(bad)], out, tokenizer="byte", context=4, errors="replace")
    assert meta["documents"] == 3
    everything = np.concatenate([read_bin(out, "train"), read_bin(out, "val")])
    assert "bad \ufffd byte" in bytes(everything[everything < 256].tolist()).decode()
    with pytest.raises(UserError, match="exists and is not empty"):
        prepare([str(SHAKESPEARE)], out, tokenizer="byte", context=4)
    meta = prepare([str(SHAKESPEARE)], out, tokenizer="byte", context=4, overwrite=True)
    assert meta["documents"] == 8 and json.loads((out / "meta.json").read_text())["documents"] == 8


@pytest.mark.parametrize("quiz", [0, 2])
def test_builtin_stories(tmp_path: Path, quiz: int) -> None:
    stories = pytest.importorskip("lmforge.data.stories")
    out = tmp_path / "stories"
    meta = prepare(
        None,
        out,
        tokenizer="char",
        builtin="stories",
        size_mb=0.05,
        seed=5,
        val_fraction=0.05,
        context=32,
        quiz=quiz,
    )
    generated = list(stories.generate_stories(5, 50_000, quiz))
    documents = [s.document for s in generated]
    assert all(d.count("\n") == quiz for d in documents)
    check_against_direct_encode(out, documents, seed=5, fraction=0.05)
    assert meta["builtin"] == {"name": "stories", "seed": 5, "size_mb": 0.05, "quiz": quiz}
    qa_val = [json.loads(line) for line in (out / "qa_val.jsonl").open()]
    qa_train = [json.loads(line) for line in (out / "qa_train.jsonl").open()]
    val_indices = {r["story_index"] for r in qa_val}
    assert val_indices and not val_indices & {r["story_index"] for r in qa_train}
    assert len(qa_val) + len(qa_train) == sum(len(s.qa) for s in generated)
    val_stories = [i for i in range(len(generated)) if is_val_document(5, i, 0.05)]
    if meta["val_documents"] == len(val_stories):  # no documents had to be moved
        assert val_indices == {i for i in val_stories if generated[i].qa}
        floor = -sum(generated[i].document_logprob for i in val_stories) / meta["val_tokens"]
        assert meta["entropy_floor_nats_per_token"] == pytest.approx(floor)
    for record in qa_val:  # the story alone: its quiz would give the answers away
        assert record["story"] == generated[record["story_index"]].text
        assert "\n" not in record["story"]
    assert 0 < meta["entropy_floor_train_nats_per_token"]
    assert 0 < meta["entropy_floor_nats_per_token"]


def test_hf_dataset_from_disk(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    texts = [json.loads(line)["text"] for line in (FIXTURES / "docs.jsonl").open()]
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "ds"))
    prepare(
        None,
        tmp_path / "out",
        tokenizer="byte",
        hf_dataset=str(tmp_path / "ds"),
        val_fraction=0.5,
        context=4,
    )
    check_against_direct_encode(tmp_path / "out", texts, 0, 0.5)


def test_cli_summary(tmp_path: Path) -> None:
    code, stdout, stderr = run_cli(
        str(SHAKESPEARE),
        "--out",
        str(tmp_path / "o"),
        "--tokenizer",
        "char",
        "--context",
        "8",
        "--workers",
        "1",
    )
    assert code == 0, stderr
    for word in (
        "bytes",
        "words",
        "documents",
        "tokens",
        "bytes/token",
        "train",
        "val",
        str(tmp_path / "o"),
    ):
        assert word in stdout


def test_token_dtype_limits() -> None:
    assert token_dtype(50257) == "uint16"
    assert token_dtype(65531) == "uint16" and token_dtype(65532) == "uint32"
    with pytest.raises(UserError, match="too large for uint32"):
        token_dtype(2**32)


# ------------------------------------------------------------------------------ bad input
def _bad_inputs(tmp: Path) -> dict[str, tuple[list[str], str]]:
    (tmp / "empty.txt").write_text("\n\n  \n")
    (tmp / "latin1.txt").write_bytes("ok line\n\ncaf\xe9\n".encode("latin-1"))
    (tmp / "small.txt").write_text("just a few words\n")
    (tmp / "notjson.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    (tmp / "nofield.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    good = str(SHAKESPEARE)
    return {
        "missing input": ([str(tmp / "nope.txt")], "does not exist"),
        "empty input": ([str(tmp / "empty.txt")], "no text"),
        "non-UTF-8": ([str(tmp / "latin1.txt")], "latin1.txt: not UTF-8 at byte offset 12"),
        "too small": ([str(tmp / "small.txt"), "--tokenizer", "char"], "fewer than one"),
        "unknown tokenizer": ([good, "--tokenizer", "sentencepiece"], "unknown tokenizer"),
        "bpe too small": ([good, "--tokenizer", "bpe:100"], "bpe:100 is too small"),
        "jsonl not JSON": ([str(tmp / "notjson.jsonl")], "notjson.jsonl:2: not valid JSON"),
        "jsonl no field": ([str(tmp / "nofield.jsonl")], 'nofield.jsonl:2: no "text" field'),
        "quiz without builtin": ([good, "--quiz", "2"], "--quiz must be 0 or more, with --builtin"),
        "negative quiz": (["--builtin", "stories", "--quiz", "-1"], "--quiz must be 0 or more"),
    }


BAD_CASES = [
    "missing input",
    "empty input",
    "non-UTF-8",
    "too small",
    "unknown tokenizer",
    "bpe too small",
    "jsonl not JSON",
    "jsonl no field",
    "quiz without builtin",
    "negative quiz",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_changes_nothing(tmp_path: Path, case: str) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    args, message = _bad_inputs(inputs)[case]
    # An earlier good output that --overwrite would replace: a failed run must leave it intact.
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.bin").write_bytes(b"\x01\x02")
    (out / "meta.json").write_text("{}")
    before = (tree_digest(inputs), tree_digest(out), sorted(os.listdir(tmp_path)))
    code, stdout, stderr = run_cli(*args, "--out", str(out), "--overwrite", "--workers", "2")
    assert code == 2, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert message in stderr
    assert (tree_digest(inputs), tree_digest(out), sorted(os.listdir(tmp_path))) == before


def test_existing_output_needs_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    before = tree_digest(out)
    code, _, stderr = run_cli(str(SHAKESPEARE), "--out", str(out), "--tokenizer", "char")
    assert code == 2 and len(stderr.strip().splitlines()) == 1
    assert "--overwrite" in stderr
    assert tree_digest(out) == before


def test_bad_input_into_new_folder_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "latin1.txt").write_bytes(b"\xe9t\xe9\n")
    out = tmp_path / "new" / "nested" / "out"
    code, _, stderr = run_cli(str(tmp_path / "latin1.txt"), "--out", str(out))
    assert code == 2 and "byte offset 0" in stderr
    assert sorted(os.listdir(tmp_path)) == ["latin1.txt"]


def test_helpers_are_consistent() -> None:
    # the split hash is uniform enough that ~fraction of documents land in val
    share = np.mean([is_val_document(0, i, 0.1) for i in range(20_000)])
    assert 0.09 < share < 0.11
    assert get_tokenizer("byte").eot_id == 256


@pytest.mark.parametrize("doc_per_file", [False, True])
def test_chunk_and_piece_boundaries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, doc_per_file: bool
) -> None:
    """Tiny read chunks, pieces and jobs give the same ids as encoding whole documents."""
    import lmforge.data.prepare as prep

    monkeypatch.setattr(prep, "READ_CHUNK", 7)
    monkeypatch.setattr(prep, "MAX_PIECE", 40)
    monkeypatch.setattr(prep, "JOB_CHARS", 50)
    long_doc = "\n".join(f"línea {i} ünïcödé — 🙂 text" for i in range(30))
    text = f"\n{long_doc}\n\n  \nshort one\r\nsecond line\r\n\r\n{long_doc}\n\n\nlast\n"
    path = tmp_path / "in.txt"
    path.write_text(text, encoding="utf-8")
    (tmp_path / "copy.txt").write_text(text, encoding="utf-8")
    inputs = [str(path), str(tmp_path / "copy.txt")] if doc_per_file else [str(path)]
    prepare(
        inputs,
        tmp_path / "out",
        tokenizer="char",
        val_fraction=0.4,
        context=8,
        workers=2,
        doc_per_file=doc_per_file,
    )
    documents = [text, text] if doc_per_file else split_documents(text)
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["documents"] == len(documents)
    tok = load_tokenizer(tmp_path / "out")
    ids = np.concatenate([read_bin(tmp_path / "out", s) for s in ("train", "val")])
    assert len(ids) == sum(len(tok.encode(d)) + 1 for d in documents)
    if doc_per_file:
        return
    check_against_direct_encode(tmp_path / "out", documents, 0, 0.4)
    # bad bytes far into the file are still reported at their exact offset
    path.write_bytes(text.encode() + b"ok\n\xc3(\n")
    with pytest.raises(UserError, match=f"byte offset {len(text.encode()) + 3} "):
        prepare([str(path)], tmp_path / "bad", tokenizer="char", context=8)
