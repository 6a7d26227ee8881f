"""Tokenizers: offline gpt2, exact round trips on fixtures and the shared real files, identity."""

from __future__ import annotations

import json
import os
import pickle
import socket
from pathlib import Path

import pytest

from lmforge import tokenizers as tk
from lmforge.chat_format import CHAT_TOKENS
from lmforge.config import padded_vocab_size
from lmforge.errors import UserError
from lmforge.tokenizers import (
    EOT,
    check_same_tokenizer,
    get_tokenizer,
    load_tokenizer,
)

FIXTURES = Path(__file__).parent / "fixtures" / "data"
ALL_NAMES = ("gpt2", "bpe:400", "char", "byte", "word")


def shared_data() -> Path | None:
    """../shared/data next to the repository, else $LMFORGE_SHARED_DATA, else None."""
    candidates = [Path(__file__).resolve().parents[2] / "shared" / "data"]
    if os.environ.get("LMFORGE_SHARED_DATA"):
        candidates.append(Path(os.environ["LMFORGE_SHARED_DATA"]))
    return next((c for c in candidates if c.is_dir()), None)


def shared_file(relative: str) -> Path:
    root = shared_data()
    if root is None or not (root / relative).is_file():
        pytest.skip(f"shared data file {relative} not present")
    return root / relative


def fixture_texts() -> dict[str, str]:
    texts = {p.name: p.read_text(encoding="utf-8") for p in sorted(FIXTURES.glob("*.txt"))}
    alpaca = json.loads((FIXTURES / "alpaca_mini.json").read_text(encoding="utf-8"))
    texts["alpaca"] = "\n\n".join(
        r["instruction"] + "\n" + r["input"] + "\n" + r["output"] for r in alpaca
    )
    squad = json.loads((FIXTURES / "squad_mini.json").read_text(encoding="utf-8"))
    texts["squad"] = "\n\n".join(p["context"] for a in squad["data"] for p in a["paragraphs"])
    texts["edge"] = "  leading spaces\r\nCRLF line\r\n\n\n\ttab\u00a0nbsp \u200b zero-width " + EOT
    return texts


def build(name: str, text: str) -> tk.Tokenizer:
    return get_tokenizer(name, [text])


def test_gpt2_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise OSError("network access in a test")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "/nonexistent-lmforge-test")
    tk._gpt2.cache_clear()  # build it now, with sockets blocked
    tok = get_tokenizer("gpt2")
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.vocab_size == 50257 and tok.eot_id == 50256
    assert tok.encode_batch(["Hello world", "Hello"]) == [[15496, 995], [15496]]


@pytest.mark.parametrize("name", ALL_NAMES)
def test_round_trip_fixtures(name: str) -> None:
    texts = fixture_texts()
    tok = get_tokenizer(name, list(texts.values()))
    for label, text in texts.items():
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids), label
        assert tok.decode(ids) == text, f"{name} does not round-trip {label}"
    assert tok.encode_batch(list(texts.values())) == [tok.encode(t) for t in texts.values()]
    # encode never parses special strings: the literal eot text is not the eot id
    assert tok.eot_id not in tok.encode(f"a {EOT} b")


def _real_texts() -> dict[str, str]:
    texts = {}
    for rel in (
        "tinyshakespeare/input.txt",
        "dailydialog/validation/dialogues_validation.txt",
        "tinystories_excerpt/tinystories_sample.txt",
    ):
        texts[rel] = shared_file(rel).read_text(encoding="utf-8")
    alpaca = json.loads(shared_file("alpaca_excerpt/alpaca_data.json").read_text("utf-8"))
    texts["alpaca"] = "\n\n".join(
        f"{r['instruction']}\n{r['input']}\n{r['output']}" for r in alpaca
    )
    squad = json.loads(shared_file("squad/dev-v1.1.json").read_text(encoding="utf-8"))
    contexts = [p["context"] for a in squad["data"] for p in a["paragraphs"]]
    texts["squad contexts"] = "\n\n".join(contexts[:400])  # a subset keeps the test fast
    return texts


@pytest.mark.parametrize("name", ALL_NAMES)
def test_round_trip_real_files(name: str) -> None:
    texts = _real_texts()
    if name.startswith("bpe"):
        # Hugging Face BPE encodes ~1-2 MB/s on 2 cores: a 300 KB prefix of each file is enough.
        texts = {label: text[:300_000] for label, text in texts.items()}
    tok = get_tokenizer(name, texts.values())
    for label, text in texts.items():
        # Line-aligned chunks through encode_batch: every character of the file is covered.
        lines = text.splitlines(keepends=True)
        chunks = ["".join(lines[i : i + 200]) for i in range(0, len(lines), 200)]
        decoded = "".join(tok.decode(ids) for ids in tok.encode_batch(chunks))
        assert decoded == text, f"{name} does not round-trip {label}"


def test_char_and_word_unknowns() -> None:
    char = build("char", "abc")
    assert char.vocab_size == 5  # a b c + eot + unk
    assert char.decode(char.encode("abz")) == "ab\ufffd"
    word = build("word", "the cat sat")
    assert word.decode(word.encode("the dog sat")) == "the <unk> sat"
    spaced = build("word", "a  b c")  # seen runs: "  " and " "; unseen "   " goes char by char
    assert spaced.decode(spaced.encode("a   b")) == "a   b"
    assert word.special_ids["<eos>"] == word.eot_id
    small = get_tokenizer("word:7", ["a a a b b c"])  # specials, " ", a, b
    assert small.vocab_size == 7 and small.decode(small.encode("a b c")) == "a b <unk>"


def test_byte_decode_invalid_sequence() -> None:
    tok = get_tokenizer("byte")
    assert tok.encode("é") == [0xC3, 0xA9]
    assert tok.decode([0xC3]) == "\ufffd"  # invalid alone: replaced, not an exception


@pytest.mark.parametrize("name", ALL_NAMES)
def test_special_ids_and_chat_tokens(name: str) -> None:
    tok = build(name, "Hi! Hello there, chat.")
    special = tok.special_ids
    assert special[EOT] == tok.eot_id < tok.vocab_size
    for i, token in enumerate(CHAT_TOKENS):
        assert special[token] == tok.vocab_size + i
    ids = tok.encode("Hi")
    user, assistant, end, pad = (special[t] for t in CHAT_TOKENS)
    text = tok.decode([user, *ids, end, assistant, *ids, end, pad, pad, tok.eot_id])
    assert text == f"<|user|>Hi<|end|><|assistant|>Hi<|end|>{EOT}"
    assert tok.padded_vocab_size >= tok.vocab_size + len(CHAT_TOKENS)


def test_padded_vocab_size() -> None:
    assert padded_vocab_size(50257) == 50304
    assert padded_vocab_size(60) == 64
    assert padded_vocab_size(61) == 128


@pytest.mark.parametrize("name", ALL_NAMES)
def test_save_load_identity(name: str, tmp_path: Path) -> None:
    text = fixture_texts()["tiny_shakespeare.txt"]
    tok = build(name, text)
    tok.save(tmp_path)
    identity = tok.identity()
    (tmp_path / "meta.json").write_text(json.dumps({"tokenizer": identity}))
    loaded = load_tokenizer(tmp_path)
    assert loaded.identity() == identity
    assert loaded.encode(text) == tok.encode(text)
    check_same_tokenizer(identity, loaded.identity(), "data and checkpoint")
    # pickling (what prepare's spawned workers receive) keeps the tokenizer
    assert pickle.loads(pickle.dumps(tok)).encode(text) == tok.encode(text)


def test_identity_mismatch_and_tampering(tmp_path: Path) -> None:
    a = build("char", "abc")
    b = build("char", "abd")
    assert a.identity()["vocab_sha256"] != b.identity()["vocab_sha256"]
    with pytest.raises(UserError, match="tokenizer mismatch between data and model"):
        check_same_tokenizer(a.identity(), b.identity(), "data and model")
    with pytest.raises(UserError):
        check_same_tokenizer(get_tokenizer("gpt2").identity(), a.identity(), "x and y")
    a.save(tmp_path)
    (tmp_path / "vocab.json").write_text(json.dumps({"type": "char", "tokens": ["a", "b", "x"]}))
    with pytest.raises(UserError, match="does not match"):
        load_tokenizer(tmp_path, a.identity())
    with pytest.raises(UserError, match="meta.json not found"):
        load_tokenizer(tmp_path / "nowhere")


def test_bad_names() -> None:
    with pytest.raises(UserError, match="unknown tokenizer 'sentencepiece'.*gpt2.*bpe:N.*char"):
        get_tokenizer("sentencepiece")
    with pytest.raises(UserError, match="bpe:100 is too small"):
        get_tokenizer("bpe:100", ["text"])
    with pytest.raises(UserError, match="whole number"):
        get_tokenizer("bpe:big", ["text"])
    with pytest.raises(UserError, match="built from the corpus"):
        get_tokenizer("char")
    for message in (str(e) for e in _errors()):
        assert "\n" not in message


def _errors() -> list[UserError]:
    found = []
    for name in ("nope", "bpe:3", "word:2", "bpe:"):
        try:
            get_tokenizer(name, ["x"])
        except UserError as e:
            found.append(e)
    assert len(found) == 4
    return found


# ------------------------------------------------------------------ the seed document's names
@pytest.mark.parametrize("name", ALL_NAMES)
def test_len_and_token_id_attributes(name: str) -> None:
    """seeds/004: len(tokenizer) sizes the model; pad_token_id pads batches."""
    tok = build(name, fixture_texts()["tinystories_mini.txt"])
    assert len(tok) == tok.vocab_size
    assert max(tok.encode("Once upon a time, a dog.")) < len(tok)
    assert tok.eos_token_id == tok.eot_id
    expected_pad = 0 if name == "word" else tok.eot_id
    assert tok.pad_token_id == expected_pad
    assert (tok.bos_token_id, tok.unk_token_id) == (
        (2, 1) if name == "word" else (None, tok.vocab_size - 1 if name == "char" else None)
    )


def test_word_tokenizer_built_the_documents_way() -> None:
    texts = ["это первый текст", "это второй текст"]
    tok = tk.WordTokenizer(vocab_size=10000)
    assert len(tok) == 4 and tok.name == "word:10000"  # only <pad> <unk> <bos> <eos>
    tok.build_vocab(texts)
    built = tk.WordTokenizer.build(texts, 10000)
    assert tok.tokens == built.tokens and tok.identity() == built.identity()
    assert tk.WordTokenizer(10000).max_vocab == 10000
    assert tok.word2idx["это"] == tok.tokens.index("это")
    assert tok.idx2word[tok.word2idx["текст"]] == "текст"
    ids = tok.encode("это текст", add_special_tokens=True)
    assert ids[0] == tok.bos_id == 2 and ids[-1] == tok.eot_id == 3
    assert tok.encode("это текст") == ids[1:-1]  # lmforge's default: no specials
    assert tok.decode(ids, skip_special_tokens=True) == "это текст"
    assert tok.decode(ids) == "<bos>это текст" + EOT
    # A limit below the corpus's distinct pieces: the most frequent ones are kept.
    small = tk.WordTokenizer(vocab_size=6)
    small.build_vocab(texts)
    assert len(small) == 6 and small.tokens[4:] == [" ", "текст"]
    assert small.decode(small.encode("это"), skip_special_tokens=True) == "<unk>"


def test_simple_tokenizer_has_the_documents_defaults(tmp_path: Path) -> None:
    tok = tk.SimpleTokenizer(vocab_size=10000)
    tok.build_vocab(["это первый текст", "это второй текст"])
    encoded = tok.encode("это текст")  # the document: [2, 5, 7, 3]
    assert encoded[0] == 2 and encoded[-1] == 3 and len(encoded) == 5  # ' ' is a token too
    assert tok.decode(encoded) == "это текст"
    assert tok.pad_token_id == 0 and len(tok) == 9 <= 10000
    # With more distinct pieces than vocab_size, len(tokenizer) is the document's 10000.
    many = tk.SimpleTokenizer(vocab_size=10000)
    many.build_vocab([" ".join(f"w{i}" for i in range(12000))])
    assert len(many) == 10000
    # It is lmforge's word tokenizer on disk: saved and loaded as word:10000.
    tok.save(tmp_path)
    back = load_tokenizer(tmp_path, tok.identity())
    assert isinstance(back, tk.WordTokenizer) and back.tokens == tok.tokens
    assert back.encode("это текст", add_special_tokens=True) == encoded
    assert pickle.loads(pickle.dumps(tok)).encode("это текст") == encoded
