"""In-memory text datasets for the Python API: ``TextDataset`` and ``create_dataloaders``.

The seed pipeline's data path (seeds/004: its ``training.dataset`` module is this one), for
small corpora that fit in memory (``lmforge prepare`` and the memmapped token files are the path
for big ones)::

    from lmforge.data.text import SimpleTokenizer, TextDataset, create_dataloaders

    train_loader, val_loader, tokenizer = create_dataloaders(
        "data/train.txt", "data/val.txt", batch_size=8, max_length=512)
    trainer = Trainer(model, train_loader, val_loader)

Documents are read from a ``.txt`` file (separated by blank lines, exactly as ``prepare`` splits
them) or a ``.jsonl`` file (one ``{"text": ...}`` object a line). Each document is encoded and
followed by the tokenizer's end-of-text token, and the whole stream is cut into sliding windows
of ``max_length + 1`` tokens, ``stride`` tokens apart (see ``TextDataset``; by default they
overlap, as the document's sliding window does). A sample is
``{"input_ids": window[:-1], "labels": window[1:]}``: labels are ALIGNED with the inputs (the loss
compares ``logits[:, i]`` with ``labels[:, i]``), so every input position has a target.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from lmforge.chat_format import IGNORE_INDEX
from lmforge.data.prepare import split_documents
from lmforge.errors import UserError
from lmforge.tokenizers import SimpleTokenizer, Tokenizer, get_tokenizer, needs_training

__all__ = [
    "EpochShuffleSampler",
    "SimpleTokenizer",
    "TextDataset",
    "collate",
    "create_dataloaders",
    "default_stride",
    "read_documents",
    "window_starts",
]

JSONL_SUFFIXES = (".jsonl",)
#: The document's stride (seeds/004: ``stride: int = 256``), the default while it overlaps windows.
SEED_STRIDE = 256


# ---------------------------------------------------------------------------------- reading
def read_documents(file_path: str | Path, field: str = "text") -> list[str]:
    """The documents of a ``.txt`` file (blank-line separated) or a ``.jsonl`` file (``field``).

    Raises ``UserError`` for a missing file, one that is not UTF-8, a bad JSON line (with
    ``file:line``) or a file without any text.
    """
    path = Path(file_path)
    if not path.is_file():
        raise UserError(f"data file not found: {path}; check the path")
    try:
        text = path.read_text(encoding="utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{path}: not UTF-8 at byte offset {e.start}; convert the file to UTF-8"
        ) from None
    if path.suffix.lower() in JSONL_SUFFIXES:
        documents = _jsonl_documents(text, path, field)
    else:
        documents = split_documents(text)
    if not documents:
        raise UserError(f"{path} holds no text (the file is empty or only whitespace)")
    return documents


def _jsonl_documents(text: str, path: Path, field: str) -> list[str]:
    documents = []
    for line_number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{line_number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(
                f"{where}: not valid JSON ({e.msg}); each line must be one JSON object"
            ) from None
        if not isinstance(record, dict) or field not in record:
            raise UserError(f'{where}: no "{field}" field; pass field="NAME" for the text field')
        value = record[field]
        if not isinstance(value, str):
            raise UserError(f'{where}: "{field}" is {type(value).__name__}, not text')
        if value.strip():
            documents.append(value)
    return documents


def window_starts(n_tokens: int, max_length: int, stride: int) -> list[int]:
    """Start offsets of the sliding windows over a stream of ``n_tokens`` tokens.

    A window holds up to ``max_length + 1`` tokens (``max_length`` inputs plus the target of the
    last one). Windows start at 0, stride, 2*stride, ...; the first window that reaches the end
    of the stream is the last one (a later one would only repeat its tail), and a window needs
    at least 2 tokens (one input, one target). So the LAST window may be short: it is kept, and
    ``collate`` pads it. The seed's example: 10 tokens, max_length=5, stride=3 -> starts
    [0, 3, 6], the last window being tokens [6, 7, 8, 9] (inputs [6, 7, 8], labels [7, 8, 9]).
    """
    starts: list[int] = []
    start = 0
    while start + 1 < n_tokens:
        starts.append(start)
        if start + max_length + 1 >= n_tokens:
            break
        start += stride
    return starts


def default_stride(max_length: int) -> int:
    """The stride when none is given: the document's 256 (half its default ``max_length`` of
    512), but never more than half of ``max_length``, so that windows always overlap and no token
    is skipped (the document's 256 with ``max_length=128`` would drop every other window's text).
    """
    return max(1, min(SEED_STRIDE, max_length // 2))


# ---------------------------------------------------------------------------------- dataset
class TextDataset(Dataset):
    """Token windows of a ``.txt`` or ``.jsonl`` file, for next-token prediction.

    Args:
        file_path: ``.jsonl`` (one JSON object a line, text in ``field``) or any other suffix,
            read as plain text whose documents are separated by blank lines.
        tokenizer: a ``lmforge.tokenizers.Tokenizer`` (anything with ``encode`` and ``eot_id``).
            Each document is its ``encode`` ids followed by end-of-text (a ``SimpleTokenizer``'s
            ids already end with ``<eos>``, which is its end-of-text: it is not doubled).
        max_length: input tokens per sample (the window holds one more token: the last target).
        stride: tokens between the starts of consecutive windows. Default: ``default_stride``,
            the document's 256 capped at ``max_length // 2``, so windows overlap as the
            document's sliding window does (a token is an input in about two samples).
            ``stride=max_length``: every token is an input exactly once; ``stride > max_length``
            skips tokens.
        field: the text field of ``.jsonl`` records.

    ``dataset[i]`` is ``{"input_ids": LongTensor[T], "labels": LongTensor[T]}`` with
    ``labels[j] = input_ids[j + 1]`` within the stream (labels aligned with inputs) and
    ``T == max_length`` except possibly for the last sample (see ``window_starts``).
    """

    def __init__(
        self,
        file_path: str | Path,
        tokenizer: Tokenizer,
        max_length: int = 512,
        stride: int | None = None,
        field: str = "text",
    ) -> None:
        if max_length < 1:
            raise UserError(f"max_length must be at least 1 (got {max_length})")
        stride = default_stride(max_length) if stride is None else stride
        if stride < 1:
            raise UserError(f"stride must be at least 1 (got {stride})")
        self.file_path = Path(file_path)
        self.tokenizer = tokenizer
        self.max_length, self.stride = max_length, stride
        documents = read_documents(file_path, field)
        self.documents = len(documents)  # how many documents the file holds
        ids: list[int] = []
        eot = tokenizer.eot_id
        for document in documents:
            document_ids = tokenizer.encode(document)
            ids.extend(document_ids)
            if not document_ids or document_ids[-1] != eot:
                ids.append(eot)  # every document ends with end-of-text (as in prepare)
        self.tokens = torch.tensor(ids, dtype=torch.long)
        self.starts = window_starts(len(ids), max_length, stride)
        if not self.starts:
            raise UserError(
                f"{self.file_path} has too little text: it encodes to {len(ids)} "
                "token(s), and a sample needs at least 2"
            )

    @classmethod
    def from_tokens(
        cls, tokens: Sequence[int], max_length: int = 512, stride: int | None = None
    ) -> TextDataset:
        """A dataset over an already tokenized stream (tests, tools); no file, no tokenizer."""
        self = cls.__new__(cls)
        self.file_path, self.tokenizer, self.documents = None, None, 0
        self.max_length = max_length
        self.stride = default_stride(max_length) if stride is None else stride
        self.tokens = torch.as_tensor(list(tokens), dtype=torch.long)
        self.starts = window_starts(len(self.tokens), max_length, self.stride)
        return self

    def __len__(self) -> int:
        return len(self.starts)

    def window(self, index: int) -> torch.Tensor:
        """The tokens of sample ``index``: its inputs followed by the last target."""
        start = self.starts[index]
        return self.tokens[start : start + self.max_length + 1]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample {index} out of range ({len(self)} samples)")
        window = self.window(index)
        return {"input_ids": window[:-1].clone(), "labels": window[1:].clone()}

    def __repr__(self) -> str:
        return (
            f"TextDataset({self.file_path}, {len(self)} samples, {len(self.tokens)} tokens, "
            f"max_length={self.max_length}, stride={self.stride})"
        )


# ---------------------------------------------------------------------------------- batching
def pad_id_of(tokenizer: Tokenizer) -> int:
    """The id that pads ``input_ids``: the tokenizer's ``pad_token_id`` (word: 0, the seed's
    <PAD>), else its end-of-text id. Padding never reaches the loss (labels are -100 there) and,
    with right padding, causal attention keeps real tokens from seeing it, so any real id does."""
    pad = getattr(tokenizer, "pad_token_id", getattr(tokenizer, "pad_id", None))
    return int(pad) if pad is not None else int(tokenizer.eot_id)


def collate(
    batch: Sequence[Mapping[str, Any] | Sequence[int] | torch.Tensor], pad_id: int = 0
) -> dict[str, torch.Tensor]:
    """Right-pad samples to the longest one.

    A sample is a dict with ``input_ids`` (and usually ``labels``, aligned with them, as
    ``TextDataset`` gives), or a bare token sequence, whose labels are then its next tokens with
    -100 at the last position (the seed's example). Returns LongTensors (B, T): ``input_ids``
    (``pad_id`` on padding), ``attention_mask`` (1 real, 0 padding), ``labels`` (-100 on padding)::

        collate([[1, 2, 3, 4], [1, 2, 3, 4, 5, 6, 7]])
        input_ids      [[1, 2, 3, 4, 0, 0, 0],        [1, 2, 3, 4, 5, 6, 7]]
        attention_mask [[1, 1, 1, 1, 0, 0, 0],        [1, 1, 1, 1, 1, 1, 1]]
        labels         [[2, 3, 4, -100, -100, -100, -100], [2, 3, 4, 5, 6, 7, -100]]
    """
    if not batch:
        raise ValueError("collate needs at least one sample")
    inputs, targets = [], []
    for sample in batch:
        if isinstance(sample, Mapping):
            ids = torch.as_tensor(sample["input_ids"], dtype=torch.long)
            labels = sample.get("labels")
            labels = _shifted(ids) if labels is None else torch.as_tensor(labels, dtype=torch.long)
        else:
            ids = torch.as_tensor(sample, dtype=torch.long)
            labels = _shifted(ids)
        if labels.shape != ids.shape:
            raise ValueError(
                f"labels {tuple(labels.shape)} and input_ids {tuple(ids.shape)} differ in shape"
            )
        inputs.append(ids)
        targets.append(labels)
    width = max(len(ids) for ids in inputs)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, target) in enumerate(zip(inputs, targets)):
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
        labels[row, : len(ids)] = target
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _shifted(ids: torch.Tensor) -> torch.Tensor:
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:-1] = ids[1:]
    return labels


class EpochShuffleSampler(Sampler[int]):
    """A seeded random order that is a pure function of (seed, epoch).

    Each ``iter()`` uses the current epoch and then moves to the next one (a new order each
    epoch); ``set_epoch(e)`` (as ``DistributedSampler`` has) pins the order of epoch ``e``, so a
    loop that resumes in epoch ``e`` reads the same samples as the run that never stopped.
    """

    def __init__(self, n_samples: int, seed: int = 0) -> None:
        self.n_samples, self.seed, self.epoch = n_samples, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n_samples, generator=generator).tolist()

    def __iter__(self):
        order = self.order(self.epoch)
        self.epoch += 1
        return iter(order)

    def __len__(self) -> int:
        return self.n_samples


def _resolve_tokenizer(tokenizer: str | Tokenizer, train_file: str | Path, field: str) -> Tokenizer:
    if not isinstance(tokenizer, str):
        return tokenizer
    # Corpus-built vocabularies (word, char, bpe:N) come from the train file's documents.
    texts = read_documents(train_file, field) if needs_training(tokenizer) else None
    return get_tokenizer(tokenizer, texts)


def create_dataloaders(
    train_file: str | Path,
    val_file: str | Path | None = None,
    batch_size: int = 8,
    max_length: int = 512,
    stride: int | None = None,
    tokenizer: str | Tokenizer = "word",
    num_workers: int = 0,
    seed: int = 0,
    shuffle: bool = True,
    field: str = "text",
    drop_last: bool = False,
) -> tuple[DataLoader, DataLoader | None, Tokenizer]:
    """``(train_loader, val_loader, tokenizer)`` over ``TextDataset``s with padding ``collate``.

    The document's call, ``create_dataloaders(train_file="data/train.txt",
    val_file="data/val.txt", batch_size=8, max_length=512, num_workers=4)``, runs as written;
    ``stride`` defaults as ``TextDataset``'s does (overlapping windows). ``tokenizer`` is a name
    (``word``, ``word:N``, ``char``, ``bpe:N`` are built from the train file; ``gpt2``, ``byte``
    are fixed) or a ``Tokenizer``; ``len(tokenizer)`` is the vocabulary size for the model. The
    train loader is shuffled with ``EpochShuffleSampler(seed)``, so its order is reproducible and
    each epoch's order can be replayed on resume; the val loader is never shuffled
    (``val_loader`` is None without ``val_file``). Batches are dicts of ``input_ids``,
    ``attention_mask``, ``labels``.
    """
    if batch_size < 1:
        raise UserError(f"batch_size must be at least 1 (got {batch_size})")
    tok = _resolve_tokenizer(tokenizer, train_file, field)
    collate_fn = functools.partial(collate, pad_id=pad_id_of(tok))
    train_set = TextDataset(train_file, tok, max_length, stride, field)
    sampler = EpochShuffleSampler(len(train_set), seed) if shuffle else None
    # The loader's own generator (its workers' base seed) is seeded too and kept apart from the
    # global RNG, so iterating it never changes what the model's dropout draws.
    loader_kw: dict[str, Any] = dict(
        batch_size=batch_size, collate_fn=collate_fn, num_workers=num_workers
    )
    train_loader = DataLoader(
        train_set,
        sampler=sampler,
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed),
        **loader_kw,
    )
    val_loader = None
    if val_file is not None:
        val_set = TextDataset(val_file, tok, max_length, stride, field)
        val_loader = DataLoader(
            val_set, shuffle=False, generator=torch.Generator().manual_seed(seed), **loader_kw
        )
    return train_loader, val_loader, tok
