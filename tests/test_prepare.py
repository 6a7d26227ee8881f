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
    (out / "meta.json").write_text(
        json.dumps({"written_by": "lmforge prepare", "files": ["train.bin", "meta.json"]})
    )
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


def _prepared(out: Path) -> Path:
    """A real prepared folder (what --overwrite may replace)."""
    prepare([str(SHAKESPEARE)], out, tokenizer="byte", context=4, workers=1)
    return out


def test_overwrite_replaces_a_folder_prepare_wrote(tmp_path: Path) -> None:
    out = _prepared(tmp_path / "out")
    assert json.loads((out / "meta.json").read_text())["written_by"] == "lmforge prepare"
    (tmp_path / "two.txt").write_text("one document\n\nand another one here\n" * 20)
    meta = prepare([str(tmp_path / "two.txt")], out, tokenizer="char", context=4, overwrite=True)
    assert meta["tokenizer"]["name"] == "char" and load_tokenizer(out).name == "char"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "two.txt"]  # no leftovers


@pytest.mark.parametrize(
    "layout, needle",
    [
        ("out is the input folder", "holds the input"),
        ("input inside out", "holds the input"),
        ("a folder of other files", "no meta.json of prepare's"),
        ("prepared, plus a file of the user's", "also holds notes.txt"),
        ("damaged meta.json", "no meta.json of prepare's"),
    ],
)
def test_overwrite_refuses_what_prepare_did_not_write(
    tmp_path: Path, layout: str, needle: str
) -> None:
    """--overwrite deletes the output folder: never one holding an input, never one (like `.`
    or `~`) holding what prepare did not write. One line, exit 2, every file still there."""
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "corpus.txt").write_text(SHAKESPEARE.read_text())
    inputs, out = [str(raw)], tmp_path / "out"
    if layout == "out is the input folder":
        out = raw
    elif layout == "input inside out":
        out = tmp_path
        inputs = [str(raw / "corpus.txt")]
    elif layout == "a folder of other files":
        out.mkdir()
        (out / "thesis.tex").write_text("years of work")
        (out / "photos").mkdir()
        (out / "photos" / "cat.jpg").write_bytes(b"\xff\xd8")
    elif layout == "prepared, plus a file of the user's":
        _prepared(out)
        (out / "notes.txt").write_text("mine")
    else:
        _prepared(out)
        (out / "meta.json").write_text("{not json")
    before = tree_digest(tmp_path)
    code, _, stderr = run_cli(*inputs, "--out", str(out), "--overwrite", "--tokenizer", "byte")
    assert code == 2, stderr
    assert len(stderr.strip().splitlines()) == 1 and needle in stderr, stderr
    assert tree_digest(tmp_path) == before


def test_stale_staging_of_a_killed_prepare_is_cleaned(tmp_path: Path) -> None:
    """A prepare killed mid-way leaves `.OUT.tmp-PID` beside the output; the next run removes it
    (and only what matches the pattern for a dead process). A run killed between moving the old
    output aside and renaming the new one in left `.OUT.tmp-PID-old`: it is put back, not lost."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    staging = tmp_path / f".out.tmp-{dead}"
    staging.mkdir()
    (staging / "train.bin").write_bytes(b"\0" * 1000)
    alive = tmp_path / f".out.tmp-{os.getpid()}-abc"  # a live process's: left alone
    alive.mkdir()
    keep = tmp_path / ".out.tmp-notes"  # not the pattern: left alone
    keep.write_text("mine")
    prepare([str(SHAKESPEARE)], tmp_path / "out", tokenizer="byte", context=4, workers=1)
    assert not staging.exists() and alive.is_dir() and keep.read_text() == "mine"
    alive.rmdir()

    # killed between the two renames: no output, the old one aside, the new one staged
    old = _prepared(tmp_path / "first")
    old.rename(tmp_path / f".out2.tmp-{dead}-old")
    (tmp_path / f".out2.tmp-{dead}").mkdir()
    before = tree_digest(tmp_path / f".out2.tmp-{dead}-old")
    with pytest.raises(UserError, match="not empty"):  # the old output is back in place
        prepare([str(SHAKESPEARE)], tmp_path / "out2", tokenizer="byte", context=4)
    assert tree_digest(tmp_path / "out2") == before
    assert not (tmp_path / f".out2.tmp-{dead}-old").exists()


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


# ------------------------------------------------------------------ data kind and phase 1
INSTRUCT = Path(__file__).parent / "fixtures" / "instruct"
KIND_CASES = [
    (INSTRUCT / "alpaca.json", "alpaca", 3),
    (INSTRUCT / "alpaca.jsonl", "alpaca", 2),
    (INSTRUCT / "squad_v1.json", "squad", None),
    (INSTRUCT / "squad_v2.json", "squad", None),
    (INSTRUCT / "dialogues.txt", "dailydialog", None),
    (INSTRUCT / "dailydialog.jsonl", "dailydialog", None),
    (INSTRUCT / "chat.jsonl", "chat", None),
    (FIXTURES / "alpaca_mini.json", "alpaca", None),
    (FIXTURES / "squad_mini.json", "squad", None),
    (FIXTURES / "dialogues_mini.txt", "dailydialog", None),
]


@pytest.mark.parametrize("path, fmt, records", KIND_CASES, ids=lambda v: getattr(v, "name", v))
def test_meta_records_the_instruction_format(tmp_path: Path, path: Path, fmt: str, records):
    """prepare writes each source's format and the folder's kind into meta.json; instruction
    files are read as one document per conversation, its turns one per line."""
    from lmforge.data.instruct import READERS

    meta = prepare([str(path)], tmp_path / "out", tokenizer="char", context=4, workers=1)
    assert meta["kind"] == "instruction" and meta["instruction_formats"] == [fmt]
    assert [s["format"] for s in meta["sources"]] == [fmt]
    saved = json.loads((tmp_path / "out" / "meta.json").read_text(encoding="utf-8"))
    assert saved["kind"] == "instruction" and saved["sources"][0]["format"] == fmt
    conversations = READERS[fmt](path)
    assert meta["documents"] == len(conversations) == (records or len(conversations))
    tok = load_tokenizer(tmp_path / "out")
    text = tok.decode(np.concatenate([read_bin(tmp_path / "out", s) for s in ("train", "val")]))
    first = "\n".join(turn.content for turn in conversations[0])
    assert first in text.split("<|endoftext|>")


def test_meta_kind_of_plain_text(tmp_path: Path) -> None:
    meta = prepare([str(SHAKESPEARE)], tmp_path / "txt", tokenizer="char", context=4, workers=1)
    assert meta["kind"] == "text" and meta["instruction_formats"] == []
    assert meta["sources"][0]["format"] == "text"
    jsonl = prepare([str(FIXTURES / "docs.jsonl")], tmp_path / "j", tokenizer="byte", context=4)
    assert jsonl["kind"] == "text"  # {"text": ...} lines
    # A file holding an Alpaca record among others makes the folder instruction data.
    both = prepare([str(SHAKESPEARE), str(INSTRUCT / "alpaca.json")], tmp_path / "both",
                   tokenizer="char", context=4, workers=1)  # fmt: skip
    assert both["kind"] == "instruction" and both["instruction_formats"] == ["alpaca"]
    # Told how to split a .txt, prepare reads a DailyDialog file as text (and still says so).
    raw = prepare([str(FIXTURES / "dialogues_mini.txt"), str(SHAKESPEARE)], tmp_path / "raw",
                  tokenizer="char", context=4, doc_per_file=True, workers=1)  # fmt: skip
    assert raw["documents"] == 2 and raw["instruction_formats"] == ["dailydialog"]


def test_json_input_must_be_instruction_data(tmp_path: Path) -> None:
    other = tmp_path / "settings.json"
    other.write_text('{"lr": 0.1, "name": "x"}', encoding="utf-8")
    from helpers import lmforge_captured, one_error_line

    result = lmforge_captured("prepare", other, "--out", tmp_path / "out")
    assert result.returncode == 2
    assert "settings.json: a .json file in no instruction format" in one_error_line(result.stderr)
    assert not (tmp_path / "out").exists()
    folder = tmp_path / "folder"  # folders are not searched for .json files
    folder.mkdir()
    (folder / "alpaca.json").write_bytes((INSTRUCT / "alpaca.json").read_bytes())
    with pytest.raises(UserError, match="folder has no .txt, .jsonl, .parquet files"):
        prepare([str(folder)], tmp_path / "out2", tokenizer="char")


PHASE1 = ["--model.n_layers=2", "--model.dim=32", "--model.n_heads=2", "--model.context=16",
          "--train.batch_size=2", "--train.max_steps=2", "--train.sample_every=0",
          "--log.plot_every=0", "--train.warmup_passes=0", "--train.eval_every=2",
          "--train.eval_batches=1", "--train.save_every_minutes=0",
          "--train.device=cpu"]  # fmt: skip


def _train(data: Path, run: Path, *extra: str):
    from helpers import lmforge_captured

    return lmforge_captured("train", f"--data.dir={data}", f"--run.dir={run}", *PHASE1, *extra)


@pytest.mark.parametrize(
    "path",
    [
        FIXTURES / "alpaca_mini.json",
        FIXTURES / "squad_mini.json",
        FIXTURES / "dialogues_mini.txt",
        INSTRUCT / "chat.jsonl",
    ],  # fmt: skip
    ids=lambda p: p.name,
)
def test_phase_1_refuses_instruction_data_in_one_line(tmp_path: Path, path: Path) -> None:
    from helpers import one_error_line

    data = tmp_path / "data"
    prepare([str(path)], data, tokenizer="char", context=16, workers=1)
    result = _train(data, tmp_path / "run")
    line = one_error_line(result.stderr)
    assert result.returncode == 2 and "was prepared from instruction data" in line
    assert f"--sft.data={path.resolve()}" in line and "--data.allow_instruction_data=true" in line
    assert not (tmp_path / "run").exists()


def test_phase_1_trains_on_instruction_data_with_the_flag(tmp_path: Path) -> None:
    data = tmp_path / "data"
    prepare([str(FIXTURES / "alpaca_mini.json")], data, tokenizer="char", context=16, workers=1)
    result = _train(data, tmp_path / "run", "--data.allow_instruction_data=true")
    assert result.returncode == 0, result.stderr
    assert "pretraining on instruction data (alpaca: alpaca_mini.json)" in result.stdout
    assert (tmp_path / "run" / "checkpoints" / "final_model.pt").is_file()


def test_phase_1_checks_folders_prepared_before_kind_was_recorded(tmp_path: Path) -> None:
    from lmforge.train.pretrain import instruction_sources

    data = tmp_path / "data"
    prepare([str(FIXTURES / "dialogues_mini.txt")], data, tokenizer="char", context=16, workers=1)
    meta = json.loads((data / "meta.json").read_text(encoding="utf-8"))
    for key in ("kind", "instruction_formats"):
        meta.pop(key)
    for source in meta["sources"]:
        source.pop("format")
    assert instruction_sources(meta)[0] == "dailydialog: dialogues_mini.txt"  # from the file
    (data / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    assert "was prepared from instruction data" in _train(data, tmp_path / "run").stderr
    plain = {**meta, "sources": [{"path": str(SHAKESPEARE)}]}
    assert instruction_sources(plain) == ("", [])


def test_data_dir_naming_an_instruction_file(tmp_path: Path) -> None:
    from helpers import one_error_line

    result = _train(FIXTURES / "squad_mini.json", tmp_path / "run")
    line = one_error_line(result.stderr)
    assert "is a file of squad instruction data" in line and "lmforge sft" in line


@pytest.mark.parametrize(
    "relative, fmt",
    [
        ("alpaca_excerpt/alpaca_data.json", "alpaca"),
        ("squad_v2_excerpt/dev-v2.0.json", "squad"),
        ("dailydialog/validation/dialogues_validation.txt", "dailydialog"),
    ],  # fmt: skip
    ids=["alpaca", "squad", "dailydialog"],
)
def test_real_instruction_files_are_refused_by_phase_1(tmp_path: Path, relative: str, fmt: str):
    """The real files in ../shared/data (skipped where absent)."""
    from lmforge.config import load_config
    from lmforge.device import pick
    from lmforge.distributed import Dist
    from lmforge.train.pretrain import pretrain_phase

    path = shared_file(relative)
    data = tmp_path / "data"
    meta = prepare([str(path)], data, tokenizer="char", context=16, workers=2)
    assert meta["kind"] == "instruction" and meta["instruction_formats"] == [fmt]
    cfg = load_config(None, [f"--data.dir={data}", *PHASE1])
    with pytest.raises(UserError, match=f"instruction data \\({fmt}: {path.name}\\)") as refused:
        pretrain_phase(cfg, Dist(), pick("cpu"))
    assert "\n" not in str(refused.value)
    cfg = load_config(None, [f"--data.dir={data}", *PHASE1, "--data.allow_instruction_data=true"])
    assert pretrain_phase(cfg, Dist(), pick("cpu")).warnings[0].startswith("pretraining on")
