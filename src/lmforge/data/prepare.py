"""`lmforge prepare`: raw text -> train.bin / val.bin / meta.json, streaming and in parallel.

The corpus is never held in memory: documents are read in chunks, encoded in batches by a
process pool (a bounded number of batches in flight), and the ids are appended to the output
files as they come back, in input order. Everything is written into a temporary sibling folder
that is renamed to the output folder only once complete, so a failure leaves nothing behind and
an existing output is never half-overwritten.

Each document is followed by the end-of-text token. The val split is chosen per document by a
seeded hash of (seed, document index), in the same single pass.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from lmforge import __version__
from lmforge.chat_format import CHAT_TOKENS
from lmforge.config import padded_vocab_size
from lmforge.errors import UserError
from lmforge.tokenizers import Tokenizer, check_tokenizer_name, get_tokenizer, needs_training

INPUT_SUFFIXES = (".txt", ".jsonl", ".parquet")
# A .json file named as an input is read when it is instruction data (an Alpaca or SQuAD file);
# folders are never searched for .json files (they hold configs and vocabularies).
INSTRUCTION_JSON = ".json"
READ_CHUNK = 1 << 20  # bytes read from a file at a time
JOB_CHARS = 1 << 20  # characters of text per encoding job sent to a worker
MAX_PIECE = 8 << 20  # a document longer than this (chars) is encoded in line-aligned pieces
BLANK_LINES = re.compile(r"\n(?:[ \t\r\f\v]*\n)+")
UINT16_MAX = 2**16 - 1
UINT32_MAX = 2**32 - 1
WRITTEN_BY = "lmforge prepare"  # meta.json's mark: --overwrite replaces only such a folder
OLD = "old"  # `.OUT.tmp-PID-old`: the output being replaced, until the new one is in place


# ------------------------------------------------------------------------------------- helpers
def token_dtype(vocab_size: int) -> str:
    """Smallest dtype holding every id, the chat tokens past the vocabulary included."""
    largest = vocab_size + len(CHAT_TOKENS)
    if largest <= UINT16_MAX:
        return "uint16"
    if largest <= UINT32_MAX:
        return "uint32"
    raise UserError(
        f"vocabulary of {vocab_size} tokens is too large for uint32 token files "
        f"(max {UINT32_MAX - len(CHAT_TOKENS)}); use a smaller vocabulary (e.g. word:N or bpe:N)"
    )


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def is_val_document(seed: int, index: int, val_fraction: float) -> bool:
    """Whether document ``index`` goes to val: a uniform hash of (seed, index) below the fraction.

    A pure function of its arguments, so the split needs one streaming pass and is reproducible.
    """
    h = _splitmix64(_splitmix64(seed & 0xFFFFFFFFFFFFFFFF) ^ index)
    return (h >> 11) * 2.0**-53 < val_fraction


def split_documents(text: str, separator: str | None = None) -> list[str]:
    """Documents of a whole .txt text, exactly as ``prepare`` reads them (for tests and tools)."""
    pattern = _separator_pattern(separator)
    return [d for d in (_clean_doc(p) for p in pattern.split(text)) if d]


def _separator_pattern(separator: str | None) -> re.Pattern[str]:
    if separator is None:
        return BLANK_LINES
    # A line holding only the separator (e.g. TinyStories' "<|endoftext|>" lines).
    return re.compile(rf"^[ \t]*{re.escape(separator)}[ \t\r]*(?:\n|\Z)", re.MULTILINE)


def _clean_doc(text: str) -> str:
    # Newlines around a document belong to the separator; a whitespace-only document is none.
    text = text.strip("\r\n")
    return text if text.strip() else ""


def _decode(data: bytes, where: str, offset: int, errors: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if errors == "replace":
            return data.decode("utf-8", errors="replace")
        raise UserError(
            f"{where}: not UTF-8 at byte offset {offset + e.start} (byte 0x{data[e.start]:02x}); "
            "convert the file to UTF-8 or pass --errors replace to replace bad bytes"
        ) from None


def _first_line(error: BaseException) -> str:
    """A library's error message cut to one line (UserError messages are one line)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _utf8_cut(data: bytes) -> int:
    """Largest cut position <= len(data) that does not split a UTF-8 character."""
    cut = len(data)
    for _ in range(3):
        if cut > 0 and (data[cut - 1] & 0xC0) == 0x80:
            cut -= 1
        else:
            break
    if cut > 0 and data[cut - 1] >= 0xC0:  # a lead byte whose continuation is in the next chunk
        cut -= 1
    return cut if cut > 0 else len(data)


# ------------------------------------------------------------------------------------- sources
@dataclass
class Piece:
    """Text of a document, or of a line-aligned part of a very long one."""

    text: str
    ends_document: bool
    extra: Any = None  # builtin corpus: the Story this document is


@dataclass
class SourceFile:
    path: Path
    size: int
    sha256: str = ""
    format: str = "text"  # or the instruction format it holds (alpaca, squad, dailydialog, ...)


def resolve_inputs(inputs: Iterable[str]) -> list[SourceFile]:
    """Input files from paths, folders (recursive) and globs, in a stable order."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_file():
            if path.suffix.lower() not in (*INPUT_SUFFIXES, INSTRUCTION_JSON):
                raise UserError(
                    f"{path}: unsupported input type {path.suffix or '(none)'!r}; "
                    f"use {', '.join(INPUT_SUFFIXES)} files or a folder of them"
                )
            files.append(path)
        elif path.is_dir():
            found = sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in INPUT_SUFFIXES
            )
            if not found:
                raise UserError(f"{path}: folder has no {', '.join(INPUT_SUFFIXES)} files")
            files.extend(found)
        elif glob.has_magic(item):
            matched = sorted(
                Path(p)
                for p in glob.glob(os.path.expanduser(item), recursive=True)
                if Path(p).is_file() and Path(p).suffix.lower() in INPUT_SUFFIXES
            )
            if not matched:
                raise UserError(f"{item}: no {', '.join(INPUT_SUFFIXES)} files match this pattern")
            files.extend(matched)
        else:
            raise UserError(f"input {item} does not exist; check the path")
    unique = list(dict.fromkeys(p.resolve() for p in files))
    return [SourceFile(p, p.stat().st_size) for p in unique]


def _read_txt(
    source: SourceFile,
    errors: str,
    doc_per_file: bool,
    separator: str | None,
    on_bytes: Callable[[int], None],
) -> Iterator[Piece]:
    """Documents of a .txt file, decoded in line-aligned chunks (so bad bytes get exact offsets)."""
    pattern = _separator_pattern(separator)
    hasher = hashlib.sha256()
    offset = 0  # file offset of buf[0]
    buf = b""
    pending = ""  # start of the document not finished yet
    open_doc = False  # part of the pending document was already emitted
    first = True
    with open(source.path, "rb") as f:
        while True:
            chunk = f.read(READ_CHUNK)
            eof = not chunk
            hasher.update(chunk)
            on_bytes(len(chunk))
            buf += chunk
            if eof:
                cut = len(buf)
            else:
                # Cut after the last newline: it never falls inside a UTF-8 character or a
                # separator line.
                cut = buf.rfind(b"\n") + 1
                if cut == 0:
                    if len(buf) < MAX_PIECE:
                        continue
                    cut = _utf8_cut(buf)
            text = _decode(buf[:cut], str(source.path), offset, errors)
            offset += cut
            buf = buf[cut:]
            if first:
                text = text.removeprefix("\ufeff")
                first = False
            pending += text
            if not doc_per_file:
                parts = pattern.split(pending)
                pending = parts.pop()
                for part in parts:
                    doc = _clean_doc(part)
                    if doc or open_doc:
                        yield Piece(doc, True)
                    open_doc = False
            if eof:
                break
            if len(pending) >= MAX_PIECE:
                # A very long document goes out in parts. Keep its last line back: with the
                # next chunk it may turn out to be followed by a separator.
                cut = len(pending)
                if not doc_per_file:
                    cut = pending.rfind("\n", 0, len(pending) - 1) + 1 or len(pending)
                part = pending[:cut] if open_doc or doc_per_file else pending[:cut].lstrip("\r\n")
                yield Piece(part, False)
                pending, open_doc = pending[cut:], True
    doc = pending if doc_per_file else _clean_doc(pending)
    if doc.strip() or open_doc:
        yield Piece(doc, True)
    source.sha256 = hasher.hexdigest()


def _read_jsonl(
    source: SourceFile, field_name: str, errors: str, on_bytes: Callable[[int], None]
) -> Iterator[Piece]:
    hasher = hashlib.sha256()
    offset = 0
    with open(source.path, "rb") as f:
        for line_number, raw in enumerate(f, 1):
            hasher.update(raw)
            on_bytes(len(raw))
            where = f"{source.path}:{line_number}"
            line = _decode(raw, where, offset, errors)
            offset += len(raw)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(
                    f"{where}: not valid JSON ({e.msg}); each line must be one JSON object"
                ) from None
            if not isinstance(record, dict) or field_name not in record:
                raise UserError(
                    f'{where}: no "{field_name}" field; pass --field NAME for the text field'
                )
            text = record[field_name]
            if not isinstance(text, str):
                raise UserError(f'{where}: "{field_name}" is {type(text).__name__}, not text')
            if text.strip():
                yield Piece(text, True)
    source.sha256 = hasher.hexdigest()


def _detect_formats(sources: list[SourceFile]) -> None:
    """Set each source's `format` from its content (`lmforge.data.instruct.detect_format`): plain
    text, or an instruction format (Alpaca, SQuAD, DailyDialog, chat, story Q&A). A .json file
    must be one of the latter."""
    from lmforge.data.instruct import FORMATS, detect_format

    for source in sources:
        found = "text"
        if source.path.suffix.lower() != ".parquet":
            try:
                found = detect_format(source.path)
            except UserError:  # e.g. {"text": ...} lines: JSON of no instruction format
                found = "text"
        source.format = found if found in FORMATS else "text"
        if source.path.suffix.lower() == INSTRUCTION_JSON and source.format == "text":
            raise UserError(
                f"{source.path}: a .json file in no instruction format (alpaca, squad, "
                f"dailydialog, chat); prepare reads {', '.join(INPUT_SUFFIXES)} text files"
            )


def _read_instruction(source: SourceFile, on_bytes: Callable[[int], None]) -> Iterator[Piece]:
    """An instruction file as plain text: one document per conversation (an Alpaca record, a
    SQuAD question with its context, a dialogue), its turns one per line. Read whole, as the
    instruction readers do (such files are small). A .txt or .jsonl file is read as text instead
    when the command says how (--doc-per-file, --doc-separator, a --field other than text);
    its format is recorded either way."""
    from lmforge.data.instruct import READERS

    conversations = READERS[source.format](source.path)
    on_bytes(source.size)
    for conversation in conversations:
        text = "\n".join(turn.content for turn in conversation if turn.content)
        if text.strip():
            yield Piece(text, True)
    source.sha256 = _file_sha256(source.path)


def _import_pyarrow() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("reading .parquet needs pyarrow: pip install 'lmforge[parquet]'") from None
    return pq


def _read_parquet(
    source: SourceFile, field_name: str, on_bytes: Callable[[int], None]
) -> Iterator[Piece]:
    pq = _import_pyarrow()
    try:
        parquet = pq.ParquetFile(source.path)
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
        raise UserError(f"{source.path}: not a readable parquet file ({_first_line(e)})") from None
    if field_name not in parquet.schema_arrow.names:
        names = ", ".join(parquet.schema_arrow.names)
        raise UserError(
            f'{source.path}: no column "{field_name}" (columns: {names}); pass --field NAME'
        )
    rows = max(parquet.metadata.num_rows, 1)
    bytes_per_row = source.size / rows  # progress is reported in file bytes
    for batch in parquet.iter_batches(columns=[field_name], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text is None:
                continue
            if not isinstance(text, str):
                raise UserError(
                    f'{source.path}: column "{field_name}" holds {type(text).__name__}, not text'
                )
            if text.strip():
                yield Piece(text, True)
        on_bytes(int(batch.num_rows * bytes_per_row))
    source.sha256 = _file_sha256(source.path)


def _file_sha256(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(READ_CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise UserError(
            "--hf-dataset needs the datasets library: pip install 'lmforge[hf]'"
        ) from None
    return datasets


def _read_hf(name: str, split: str, field_name: str) -> Iterator[Piece]:
    datasets = _import_datasets()
    if Path(name).exists():  # a dataset saved with save_to_disk
        try:
            dataset = datasets.load_from_disk(name)
        except Exception as e:
            raise UserError(
                f"{name}: not a dataset saved with save_to_disk ({_first_line(e)})"
            ) from None
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise UserError(
                    f"{name}: no split {split!r} (splits: {', '.join(dataset)}); pass --hf-split"
                )
            dataset = dataset[split]
    else:
        try:
            dataset = datasets.load_dataset(name, split=split, streaming=True)
        except Exception as e:  # network, missing dataset, bad split: all user-fixable
            raise UserError(
                f"cannot load Hugging Face dataset {name!r}: {_first_line(e)}; check the name "
                "and that you are online"
            ) from None
    for index, record in enumerate(dataset):
        if field_name not in record:
            raise UserError(
                f'{name}: record {index} has no "{field_name}" field '
                f"(fields: {', '.join(record)}); pass --field NAME"
            )
        text = record[field_name]
        if isinstance(text, str) and text.strip():
            yield Piece(text, True)


def _read_builtin(name: str, seed: int, size_bytes: int, quiz: int) -> Iterator[Piece]:
    if name != "stories":
        raise UserError(f"unknown built-in corpus {name!r}; the built-in corpus is: stories")
    from lmforge.data.stories import generate_stories

    for story in generate_stories(seed, size_bytes, quiz):
        yield Piece(story.document, True, story)


# ------------------------------------------------------------------------------- encoding pool
_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer: Tokenizer, dtype: str) -> None:
    _WORKER["tokenizer"] = tokenizer
    _WORKER["dtype"] = np.dtype(dtype)


def _encode_job(job: tuple[list[str], list[bool], list[bool]]) -> tuple[Any, ...]:
    """Encode pieces: (train ids bytes, val ids bytes, tokens per piece, words, text bytes)."""
    texts, to_val, ends = job
    tokenizer: Tokenizer = _WORKER["tokenizer"]
    dtype: np.dtype = _WORKER["dtype"]
    eot = np.array([tokenizer.eot_id], dtype=dtype)
    arrays = tokenizer.encode_arrays(texts)
    parts: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
    counts = np.empty(len(texts), dtype=np.int64)
    for i, (ids, val, end) in enumerate(zip(arrays, to_val, ends)):
        parts[val].append(ids.astype(dtype, copy=False))
        if end:
            parts[val].append(eot)
        counts[i] = len(ids) + end
    blobs = [np.concatenate(p).tobytes() if p else b"" for p in parts]
    words = sum(len(t.split()) for t in texts)
    text_bytes = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
    return blobs[0], blobs[1], counts, words, text_bytes


def _jobs(pieces: Iterable[Piece], seed: int, val_fraction: float) -> Iterator[tuple[Any, Any]]:
    """Group pieces into jobs; yields (job for a worker, per-piece info kept by the writer)."""
    texts: list[str] = []
    info: list[tuple[int, bool, Piece]] = []
    chars = 0
    doc_index = 0
    for piece in pieces:
        val = is_val_document(seed, doc_index, val_fraction)
        texts.append(piece.text)
        info.append((doc_index, val, piece))
        chars += len(piece.text)
        if piece.ends_document:
            doc_index += 1
        if chars >= JOB_CHARS or len(texts) >= 8192:
            yield (texts, [i[1] for i in info], [i[2].ends_document for i in info]), info
            texts, info, chars = [], [], 0
    if texts:
        yield (texts, [i[1] for i in info], [i[2].ends_document for i in info]), info


class _InlinePool:
    """Stands in for a process pool when one worker is asked for (no process start-up cost)."""

    class _Done:
        def __init__(self, value: Any) -> None:
            self.value = value

        def get(self) -> Any:
            return self.value

    def __init__(self, tokenizer: Tokenizer, dtype: str) -> None:
        _init_worker(tokenizer, dtype)

    def apply_async(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> _Done:
        return self._Done(fn(*args))

    def terminate(self) -> None:
        _WORKER.clear()


def _make_pool(workers: int, tokenizer: Tokenizer, dtype: str) -> Any:
    if workers <= 1:
        return _InlinePool(tokenizer, dtype)
    import multiprocessing as mp

    # fork starts workers in milliseconds and shares the built tokenizer; spawn where there is
    # no fork (Windows) or where fork is unsafe by default (macOS).
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    # Hugging Face tokenizers warns (and disables threads) in forked children unless told.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return mp.get_context(method).Pool(workers, _init_worker, (tokenizer, dtype))


# ------------------------------------------------------------------------------------- prepare
@dataclass
class _Stats:
    documents: int = 0
    val_documents: int = 0
    words: int = 0
    text_bytes: int = 0
    train_tokens: int = 0
    val_tokens: int = 0
    train_neg_logprob: float = 0.0
    val_neg_logprob: float = 0.0
    # Last train documents (index, tokens, -logprob): moved to val when val is too small.
    tail: deque[tuple[int, int, float]] = field(default_factory=deque)
    tail_tokens: int = 0


def _progress_bar(total: int | None, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, file=sys.stderr, leave=False)


def _output_is_busy(out: Path) -> bool:
    return out.exists() and (not out.is_dir() or any(out.iterdir()))


def _check_replaceable(out: Path, inputs: list[Path]) -> None:
    """--overwrite deletes `out`: only a folder this command wrote (its meta.json says so and
    every entry is one it lists), and never one that holds an input (the input would go too)."""
    for path in inputs:
        if path == out or out in path.parents:
            raise UserError(
                f"--overwrite would delete {out}, which holds the input {path}: choose an --out "
                "folder outside the inputs"
            )
    refuse = (
        f"--overwrite replaces only a folder that lmforge prepare wrote, and {out} is not one "
        "({}); choose another --out, or empty the folder yourself"
    )
    meta = _prepared_meta(out / "meta.json")
    if meta is None:
        raise UserError(refuse.format("no meta.json of prepare's in it"))
    extra = sorted(p.name for p in out.iterdir() if p.name not in meta["files"])
    if extra:
        raise UserError(refuse.format(f"it also holds {extra[0]}, which prepare did not write"))


def _prepared_meta(path: Path) -> dict[str, Any] | None:
    """meta.json as prepare wrote it (marked `written_by`; before that mark, a meta.json with
    lmforge_version and its list of files), else None."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or not isinstance(meta.get("files"), list):
        return None
    if meta.get("written_by") == WRITTEN_BY or "lmforge_version" in meta:
        return meta
    return None


def _clean_after_killed_runs(out: Path) -> None:
    """What a killed prepare (or any killed lmforge write) left beside `out`: staging folders and
    temporary files are deleted. An earlier output moved aside by a run killed before its new
    output took its place is put back first, so it is never lost."""
    from lmforge.files import TEMP_NAME, _pid_alive, remove_stale_temporaries

    if not out.parent.is_dir():
        return
    for entry in sorted(out.parent.glob(f".{glob.escape(out.name)}.tmp-*-{OLD}")):
        match = TEMP_NAME.match(entry.name)
        if match and not out.exists() and not _pid_alive(int(match.group("pid"))):
            entry.rename(out)
    remove_stale_temporaries(out.parent)


def prepare(
    inputs: list[str] | None,
    out_dir: str | Path,
    tokenizer: str = "gpt2",
    field: str = "text",
    val_fraction: float = 0.005,
    seed: int = 0,
    workers: int | None = None,
    overwrite: bool = False,
    errors: str = "strict",
    context: int = 256,
    doc_per_file: bool = False,
    doc_separator: str | None = None,
    builtin: str | None = None,
    size_mb: float = 4.0,
    quiz: int = 0,
    hf_dataset: str | None = None,
    hf_split: str = "train",
    progress: bool | None = None,
) -> dict[str, Any]:
    """Tokenize text into ``out_dir`` (train.bin, val.bin, meta.json, tokenizer files).

    Exactly one source: ``inputs`` (files, folders, globs), ``builtin`` ("stories", with ``quiz``
    questions after each story) or ``hf_dataset``. Returns the summary (meta.json's content plus
    ``out_dir``). Raises UserError, with nothing written, for bad input.
    """
    # -- checks that need no reading
    sources_given = sum(bool(x) for x in (inputs, builtin, hf_dataset))
    if sources_given != 1:
        raise UserError(
            "give exactly one source: INPUT files/folders, --builtin stories or --hf-dataset NAME"
        )
    if errors not in ("strict", "replace"):
        raise UserError(f"--errors must be strict or replace, not {errors!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if context < 1:
        raise UserError(f"--context must be at least 1, got {context}")
    if builtin is not None and not 0 < size_mb < 1e6:
        raise UserError(f"--size-mb must be a positive number of megabytes, got {size_mb}")
    if workers is not None and workers < 0:
        raise UserError(f"--workers must be >= 1 (0 = all cores), got {workers}")
    if quiz < 0 or (quiz and builtin is None):
        raise UserError(f"--quiz must be 0 or more, with --builtin stories (got {quiz})")
    check_tokenizer_name(tokenizer)
    sources = resolve_inputs(inputs) if inputs else []
    _detect_formats(sources)
    out = Path(out_dir).expanduser().resolve()
    _clean_after_killed_runs(out)  # first: it may put back an output a killed run moved aside
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} is a file, not a folder; choose another --out")
    if _output_is_busy(out) and not overwrite:
        raise UserError(f"output {out} exists and is not empty; pass --overwrite to replace it")
    if _output_is_busy(out):
        local_hf = [Path(hf_dataset).resolve()] if hf_dataset and Path(hf_dataset).exists() else []
        _check_replaceable(out, [s.path for s in sources] + local_hf)
    workers = max(1, workers or os.cpu_count() or 1)
    if progress is None:
        progress = sys.stderr.isatty()
    size_bytes = int(size_mb * 1e6)

    def pieces(on_bytes: Callable[[int], None]) -> Iterator[Piece]:
        if builtin is not None:
            for piece in _read_builtin(builtin, seed, size_bytes, quiz):
                on_bytes(len(piece.text.encode("utf-8")))
                yield piece
        elif hf_dataset is not None:
            yield from _read_hf(hf_dataset, hf_split, field)
        for source in sources:
            suffix = source.path.suffix.lower()
            as_told = doc_per_file or doc_separator or field != "text"  # how to read text
            if source.format != "text" and not (as_told and suffix in (".txt", ".jsonl")):
                yield from _read_instruction(source, on_bytes)
            elif suffix == ".txt":
                yield from _read_txt(source, errors, doc_per_file, doc_separator, on_bytes)
            elif suffix == ".jsonl":
                yield from _read_jsonl(source, field, errors, on_bytes)
            else:
                yield from _read_parquet(source, field, on_bytes)

    total_bytes = size_bytes if builtin else (sum(s.size for s in sources) or None)

    # -- everything is written into a sibling folder, renamed into place when complete
    created_parent = None  # the topmost folder this run creates, removed again on failure
    for ancestor in out.parents:
        if ancestor.exists():
            break
        created_parent = ancestor
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    started = time.time()
    try:
        tok = _build_tokenizer(tokenizer, pieces, total_bytes, progress)
        dtype = token_dtype(tok.vocab_size)
        stats = _encode_corpus(
            tok,
            dtype,
            pieces,
            tmp,
            workers,
            seed,
            val_fraction,
            context,
            builtin,
            total_bytes,
            progress,
        )
        if stats.documents == 0:
            raise UserError("the input has no text (all files are empty); give files with text")
        _ensure_val_window(stats, tmp, dtype, context, builtin is not None)
        meta = _meta(tok, dtype, stats, sources, seed, val_fraction, context, field, doc_per_file)
        meta["elapsed_seconds"] = round(time.time() - started, 3)
        if builtin is not None:
            meta["builtin"] = {"name": builtin, "seed": seed, "size_mb": size_mb, "quiz": quiz}
            meta["entropy_floor_nats_per_token"] = stats.val_neg_logprob / stats.val_tokens
            meta["entropy_floor_train_nats_per_token"] = (
                stats.train_neg_logprob / stats.train_tokens
            )
        if hf_dataset is not None:
            meta["hf_dataset"] = {"name": hf_dataset, "split": hf_split, "field": field}
            meta["kind"] = "unchecked"  # only the text field of its records is read
        meta["files"] = ["train.bin", "val.bin", "meta.json", *tok.save(tmp)]
        if builtin is not None:
            meta["files"] += ["qa_train.jsonl", "qa_val.jsonl"]
        _write_json(tmp / "meta.json", meta)
        _move_into_place(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if created_parent is not None:
            shutil.rmtree(created_parent, ignore_errors=True)
        if isinstance(e, OSError) and e.errno is not None:  # the disk said no: nothing is left
            from lmforge.files import disk_error

            raise disk_error(out, e) from None
        raise
    return {**meta, "out_dir": str(out)}


def _build_tokenizer(
    name: str,
    pieces: Callable[[Callable[[int], None]], Iterator[Piece]],
    total_bytes: int | None,
    progress: bool,
) -> Tokenizer:
    if not needs_training(name):
        return get_tokenizer(name)
    bar = _progress_bar(total_bytes, f"building {name} vocabulary", progress)
    on_bytes = bar.update if bar is not None else (lambda n: None)
    try:
        return get_tokenizer(name, _vocabulary_texts(pieces(on_bytes)))
    finally:
        if bar is not None:
            bar.close()


def _vocabulary_texts(pieces: Iterator[Piece]) -> Iterator[str]:
    """What a trained vocabulary is built from: the documents and, for the built-in corpus, its
    questions and answers too (so "Who ...?" is not an unknown character in phase 2)."""
    for piece in pieces:
        yield piece.text
        for question, answer in getattr(piece.extra, "qa", ()):
            yield f"{question}\n{answer}"  # the SFT template puts a newline before questions


def _encode_corpus(
    tok: Tokenizer,
    dtype: str,
    pieces: Callable[[Callable[[int], None]], Iterator[Piece]],
    tmp: Path,
    workers: int,
    seed: int,
    val_fraction: float,
    context: int,
    builtin: str | None,
    total_bytes: int | None,
    progress: bool,
) -> _Stats:
    stats = _Stats()
    doc_tokens = 0  # tokens so far of the document being written (it may span pieces/jobs)

    def write(result: tuple[Any, ...], info: list[tuple[int, bool, Piece]], files: Any) -> None:
        nonlocal doc_tokens
        train_file, val_file, qa_train, qa_val = files
        train_blob, val_blob, counts, words, text_bytes = result
        train_file.write(train_blob)
        val_file.write(val_blob)
        stats.words += words
        stats.text_bytes += text_bytes
        for (doc_index, val, piece), count in zip(info, counts.tolist()):
            doc_tokens += count
            if not piece.ends_document:
                continue
            _count_document(stats, doc_index, val, doc_tokens, piece.extra, context)
            if piece.extra is not None:
                _write_qa(qa_val if val else qa_train, doc_index, piece.extra)
            doc_tokens = 0

    pool = bar = None
    try:
        pool = _make_pool(workers, tok, dtype)  # before the bar: fork with no monitor thread
        bar = _progress_bar(total_bytes, "encoding", progress)
        on_bytes = bar.update if bar is not None else (lambda n: None)
        in_flight: deque[tuple[Any, Any]] = deque()
        with (
            open(tmp / "train.bin", "wb") as train_file,
            open(tmp / "val.bin", "wb") as val_file,
            _open_if(builtin is not None, tmp / "qa_train.jsonl") as qa_train,
            _open_if(builtin is not None, tmp / "qa_val.jsonl") as qa_val,
        ):
            files = (train_file, val_file, qa_train, qa_val)
            for job, info in _jobs(pieces(on_bytes), seed, val_fraction):
                in_flight.append((pool.apply_async(_encode_job, (job,)), info))
                # A bounded window of jobs in flight keeps memory flat however big the corpus.
                while len(in_flight) > 2 * workers:
                    result, done_info = in_flight.popleft()
                    write(result.get(), done_info, files)
            while in_flight:
                result, done_info = in_flight.popleft()
                write(result.get(), done_info, files)
            for f in (train_file, val_file):
                f.flush()
                os.fsync(f.fileno())
    finally:
        if pool is not None:
            pool.terminate()
        if bar is not None:
            bar.close()
    return stats


def _open_if(enabled: bool, path: Path) -> Any:
    """A text file open for writing, or a context that yields None when not ``enabled``."""
    return open(path, "w", encoding="utf-8") if enabled else contextlib.nullcontext()


def _count_document(
    stats: _Stats, doc_index: int, val: bool, tokens: int, story: Any, context: int
) -> None:
    neg_logprob = -story.document_logprob if story is not None else 0.0
    stats.documents += 1
    if val:
        stats.val_documents += 1
        stats.val_tokens += tokens
        stats.val_neg_logprob += neg_logprob
        return
    stats.train_tokens += tokens
    stats.train_neg_logprob += neg_logprob
    # Keep just enough trailing train documents to fill one val window if val ends up short.
    stats.tail.append((doc_index, tokens, neg_logprob))
    stats.tail_tokens += tokens
    while stats.tail and stats.tail_tokens - stats.tail[0][1] >= context + 1:
        stats.tail_tokens -= stats.tail.popleft()[1]


def _write_qa(file: Any, story_index: int, story: Any) -> None:
    for question, answer in story.qa:
        record = {"story": story.text, "question": question, "answer": answer}
        record["story_index"] = story_index
        file.write(json.dumps(record, ensure_ascii=False) + "\n")


def _ensure_val_window(stats: _Stats, tmp: Path, dtype: str, context: int, qa: bool) -> None:
    """Move the last train documents to val until val holds one window (context + 1 tokens)."""
    window = context + 1
    total = stats.train_tokens + stats.val_tokens
    if total < 2 * window:
        raise UserError(
            f"the corpus has {total} tokens, fewer than one train and one val window "
            f"(2 x (context {context} + 1) = {2 * window}); add text or lower --context"
        )
    moved: list[tuple[int, int, float]] = []
    while stats.val_tokens < window and stats.tail:
        doc_index, tokens, neg_logprob = stats.tail.pop()
        moved.append((doc_index, tokens, neg_logprob))
        stats.train_tokens -= tokens
        stats.val_tokens += tokens
        stats.train_neg_logprob -= neg_logprob
        stats.val_neg_logprob += neg_logprob
        stats.val_documents += 1
    if stats.train_tokens < window or stats.val_tokens < window:
        raise UserError(
            f"cannot split {stats.documents} document(s), {total} tokens, into train and val "
            f"sets of at least {window} tokens each; add text, split it into more documents "
            "(blank lines) or lower --context"
        )
    if not moved:
        return
    # The moved documents are the last ones written to train.bin: move that tail to val.bin.
    itemsize = np.dtype(dtype).itemsize
    moved_tokens = sum(m[1] for m in moved)
    train_path = tmp / "train.bin"
    with open(train_path, "r+b") as train_file, open(tmp / "val.bin", "ab") as val_file:
        train_file.seek(stats.train_tokens * itemsize)
        val_file.write(train_file.read(moved_tokens * itemsize))
        train_file.truncate(stats.train_tokens * itemsize)
    if qa:
        moved_indices = {m[0] for m in moved}
        lines = (tmp / "qa_train.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
        keep = [line for line in lines if json.loads(line)["story_index"] not in moved_indices]
        move = [line for line in lines if json.loads(line)["story_index"] in moved_indices]
        (tmp / "qa_train.jsonl").write_text("".join(keep), encoding="utf-8")
        with open(tmp / "qa_val.jsonl", "a", encoding="utf-8") as f:
            f.write("".join(move))


def _meta(
    tok: Tokenizer,
    dtype: str,
    stats: _Stats,
    sources: list[SourceFile],
    seed: int,
    val_fraction: float,
    context: int,
    field_name: str,
    doc_per_file: bool,
) -> dict[str, Any]:
    tokens = stats.train_tokens + stats.val_tokens
    return {
        "written_by": WRITTEN_BY,
        "lmforge_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tokenizer": tok.identity(),
        "vocab_size": tok.vocab_size,
        "padded_vocab_size": padded_vocab_size(tok.vocab_size),
        "eot_id": tok.eot_id,
        "special_ids": tok.special_ids,
        "dtype": dtype,
        "train_tokens": stats.train_tokens,
        "val_tokens": stats.val_tokens,
        "tokens": tokens,
        "documents": stats.documents,
        "train_documents": stats.documents - stats.val_documents,
        "val_documents": stats.val_documents,
        "words": stats.words,
        "bytes": stats.text_bytes,
        "bytes_per_token": round(stats.text_bytes / tokens, 4) if tokens else None,
        "sources": [
            {"path": str(s.path), "bytes": s.size, "sha256": s.sha256, "format": s.format}
            for s in sources
        ],
        # What phase 1 checks: "text", or "instruction" when a source is in an instruction
        # format (they are then listed, and `lmforge train` refuses the folder unless told).
        "kind": "instruction" if any(s.format != "text" for s in sources) else "text",
        "instruction_formats": sorted({s.format for s in sources} - {"text"}),
        "seed": seed,
        "val_fraction": val_fraction,
        "context": context,
        "field": field_name,
        "doc_per_file": doc_per_file,
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished folder to ``out``; an old ``out`` is removed only after that."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.tmp-{os.getpid()}-{OLD}"
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def format_summary(summary: dict[str, Any]) -> str:
    """The plain summary printed after a run."""
    files = len(summary.get("sources", []))
    if summary.get("builtin"):
        builtin = summary["builtin"]
        quiz = f", quiz {builtin['quiz']}" if builtin.get("quiz") else ""
        origin = f"built-in {builtin['name']} (seed {builtin['seed']}{quiz})"
    elif summary.get("hf_dataset"):
        origin = f"Hugging Face dataset {summary['hf_dataset']['name']}"
    else:
        origin = f"{files} file(s)"
    lines = [
        f"prepared {origin} with tokenizer {summary['tokenizer']['name']} "
        f"(vocab {summary['vocab_size']}, {summary['dtype']})",
        f"  bytes {summary['bytes']:,}  words {summary['words']:,}  "
        f"documents {summary['documents']:,}  tokens {summary['tokens']:,}  "
        f"bytes/token {summary['bytes_per_token']}",
        f"  train {summary['train_tokens']:,} tokens ({summary['train_documents']:,} docs)  "
        f"val {summary['val_tokens']:,} tokens ({summary['val_documents']:,} docs)  "
        f"in {summary['elapsed_seconds']:.1f} s",
    ]
    if "entropy_floor_nats_per_token" in summary:
        lines.append(
            f"  entropy floor: val {summary['entropy_floor_nats_per_token']:.4f}, "
            f"train {summary['entropy_floor_train_nats_per_token']:.4f} nats/token"
        )
    lines.append(f"  output: {summary['out_dir']}")
    return "\n".join(lines)
