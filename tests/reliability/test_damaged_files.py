"""Files lmforge reads back, damaged: a prepared folder's meta.json (every key a reader relies on),
its token files, and the tokenizer files. Each is one UserError naming the file and the problem,
never a KeyError or a library's traceback. In-process: the matrix of whole commands is in
test_bad_input.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lmforge.data.memmap import READ_META_NEEDS, TokenBatches, read_meta
from lmforge.errors import UserError
from lmforge.tokenizers import BPETokenizer, CharTokenizer, WordTokenizer, load_tokenizer

TEXT = "the cat sat on the mat. the dog ate the hat.\n" * 20
TRAINED = {  # the tokenizers whose vocabulary is a file
    "char": lambda: CharTokenizer.build([TEXT]),
    "word": lambda: WordTokenizer.build([TEXT]),
    "bpe": lambda: BPETokenizer.train([TEXT], 300),
}


@pytest.fixture
def data(stories: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(stories, copy)
    return copy


def edit_meta(folder: Path, **changes: object) -> None:
    meta = json.loads((folder / "meta.json").read_text())
    for key, value in changes.items():
        if value is None:
            del meta[key]
        else:
            meta[key] = value
    (folder / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("key", READ_META_NEEDS)
def test_meta_without_a_key(data: Path, key: str) -> None:
    edit_meta(data, **{key: None})
    with pytest.raises(UserError, match=f"meta.json is damaged: it has no '{key}'"):
        read_meta(data)


@pytest.mark.parametrize(
    "changes, needle",
    [
        ({"vocab_size": "51"}, "'vocab_size' is '51', not a positive whole number"),
        ({"vocab_size": True}, "'vocab_size' is True"),
        ({"train_tokens": -3}, "'train_tokens' is -3"),
        ({"val_tokens": 0}, "'val_tokens' is 0"),
        ({"dtype": "int64"}, "'dtype' is 'int64', not uint16 or uint32"),
        ({"tokenizer": "char"}, "'tokenizer' is 'char'"),
        ({"eot_id": 51}, "eot_id 51 is outside the vocabulary of 51 tokens"),
        ({"vocab_size": 60}, "vocab_size 60 differs from its tokenizer's 51"),
    ],
)
def test_meta_with_a_wrong_value(data: Path, changes: dict, needle: str) -> None:
    edit_meta(data, **changes)
    with pytest.raises(UserError, match=needle.replace("(", r"\(")):
        read_meta(data)


@pytest.mark.parametrize(
    "content, needle",
    [(b"{not json", "not JSON"), (b"[1, 2]", "not a JSON object"), (b'{"a": "\xff"}', "not JSON")],
)
def test_meta_that_is_not_a_json_object(data: Path, content: bytes, needle: str) -> None:
    (data / "meta.json").write_bytes(content)
    with pytest.raises(UserError, match=needle):
        read_meta(data)


def test_a_data_folder_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "data").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        read_meta(tmp_path / "data")


def test_token_ids_past_the_vocabulary_are_named(data: Path) -> None:
    """A token file of the right size but the wrong ids (damaged, another tokenizer's) would
    crash the embedding lookup mid-run, on a GPU as a device-side assert."""
    ids = np.fromfile(data / "train.bin", dtype=np.uint16)
    ids[1000] = 60_000
    ids.tofile(data / "train.bin")
    batches = TokenBatches(data / "train.bin", context=len(ids) - 2, batch_size=1, seed=0)
    with pytest.raises(UserError, match="token id 60000 at position 1000 is outside the vocab"):
        batches.get_batch(0)


def test_a_changed_vocabulary_file_is_refused(data: Path) -> None:
    """Same size, two tokens swapped: another tokenizer, which the recorded hash tells."""
    vocab = json.loads((data / "vocab.json").read_text())
    vocab["tokens"][:2] = vocab["tokens"][1::-1]
    (data / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    with pytest.raises(UserError, match="vocab.json does not match the recorded tokenizer"):
        load_tokenizer(data)


def _saved(tokenizer, folder: Path) -> dict:
    tokenizer.save(folder)
    identity = tokenizer.identity()
    del identity["vocab_sha256"]  # as an older prepare wrote it: the file is not hash-checked
    return identity


@pytest.mark.parametrize("kind", sorted(TRAINED))
@pytest.mark.parametrize(
    "damage", [b"{not json", b'{"tokens": 5}', b'{"tokens": ["ab", 3]}', b"\xff\xfe"]
)
def test_damaged_vocabulary_files(tmp_path: Path, kind: str, damage: bytes) -> None:
    identity = _saved(TRAINED[kind](), tmp_path)
    assert load_tokenizer(tmp_path, identity).vocab_size == identity["vocab_size"]
    (tmp_path / identity["vocab_file"]).write_bytes(damage)
    with pytest.raises(UserError, match="is damaged"):
        load_tokenizer(tmp_path, identity)


@pytest.mark.parametrize(
    "identity, needle",
    [
        ({"vocab_size": 51}, 'names no tokenizer \\(no "name"\\)'),
        ({"name": "sentencepiece"}, "unknown tokenizer 'sentencepiece'"),
        ({"name": "char", "vocab_file": "../../etc/passwd"}, "is not a file name"),
        ({"name": "char"}, "vocab.json not found"),
    ],
)
def test_tokenizer_records_that_name_nothing_loadable(
    tmp_path: Path, identity: dict, needle: str
) -> None:
    with pytest.raises(UserError, match=needle):
        load_tokenizer(tmp_path, identity)


def test_meta_tokenizer_block_damaged(tmp_path: Path) -> None:
    (tmp_path / "meta.json").write_bytes(b"\xff\xfe not text")
    with pytest.raises(UserError, match="has no valid tokenizer block"):
        load_tokenizer(tmp_path)
