"""Instruction-tuning data: read conversations, render them to ids + loss labels, batch them.

The pieces, in the order a run uses them:

1. Readers turn each supported file format into conversations (``list[Turn]``):
   Alpaca JSON/JSONL, SQuAD v1.1/v2.0, DailyDialog (``__eou__`` text or ``dialog`` lists),
   generic chat JSONL (``{"messages": [...]}``) and lmforge's built-in story Q&A JSONL.
   ``load_sources`` reads a comma-separated list of files/folders and mixes them by weight.
2. ``render_all`` renders them with the one template (``lmforge.chat_format.render``: ids and
   loss labels in one pass, labels aligned with ids).
3. ``pad_batch`` (right padding) and ``pack_examples`` (several examples per row, with
   ``position_ids`` restarting per example and ``doc_ids`` that keep attention inside each
   example) make tensors; ``SFTBatches`` serves them in a deterministic, resumable order.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lmforge.chat_format import IGNORE_INDEX, Conversation, Example, Turn, render
from lmforge.errors import UserError

if TYPE_CHECKING:  # torch is imported where batches are made: reading and detecting need none
    import torch

log = logging.getLogger(__name__)

#: The assistant reply for SQuAD v2.0 questions the context cannot answer (``is_impossible``).
REFUSAL = "I cannot answer that from the text."

#: Names accepted as ``FORMAT:`` in a data spec, and returned by ``detect_format``.
FORMATS = ("alpaca", "squad", "dailydialog", "chat", "stories-qa")

_SKIP_HINT = "fix it or pass --sft.skip_bad=true to skip malformed records"
_PLAIN_TEXT_HINT = (
    "instruction tuning expects alpaca, squad, dailydialog, chat or stories-qa data; name the "
    "format as FORMAT:PATH if it was misdetected, or pass --sft.allow_plain_text=true to train "
    "on the plain text anyway"
)


class Conversations(list):
    """A list of conversations that also remembers what reading it skipped or mixed.

    ``skipped`` counts malformed records left out with ``skip_bad=True``; ``sources`` (filled by
    ``load_sources``) says per source how many records were read and how many were used.
    """

    def __init__(self, items: Iterable[Conversation] = (), skipped: int = 0) -> None:
        super().__init__(items)
        self.skipped = skipped
        self.sources: list[SourceSummary] = []


@dataclass
class SourceSummary:
    """What one entry of a data spec contributed (for the CLI's start-of-run printout)."""

    path: str
    format: str
    records: int
    skipped: int
    weight: float
    used: int


# --------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    """The file's text; one-line UserErrors for the usual ways this fails."""
    if not path.exists():
        raise UserError(f"{path} does not exist; check the path in the data spec")
    if path.is_dir():
        raise UserError(f"{path} is a folder, not a file; name a file or use load_sources")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: tolerate a byte-order mark
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}); re-save it as UTF-8") from e
    if not text.strip():
        raise UserError(f"{path} is empty; give a file with at least one record")
    return text


class _Records:
    """Collects good records and counts (or raises for) bad ones, with file + record in messages."""

    def __init__(self, path: Path, fmt: str, skip_bad: bool) -> None:
        self.path, self.fmt, self.skip_bad = path, fmt, skip_bad
        self.conversations = Conversations()

    def bad(self, where: str, problem: str) -> None:
        if not self.skip_bad:
            raise UserError(f"{self.path}: {where}: {problem}; {_SKIP_HINT}")
        self.conversations.skipped += 1

    def add(self, conversation: Conversation) -> None:
        self.conversations.append(conversation)

    def done(self) -> Conversations:
        # (what was skipped is counted in `skipped`: the run's header states it)
        if not self.conversations:
            raise UserError(f"{self.path} holds no usable {self.fmt} records; check the format")
        return self.conversations


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def _json_records(path: Path, recs: _Records) -> Iterator[tuple[str, Any]]:
    """Yield ``(where, record)`` from a JSON array, a single JSON object, or JSONL.

    ``where`` names the record for error messages: "record N" for arrays, "line N" for JSONL.
    Unparseable JSONL lines are reported (or skipped with skip_bad) one by one.
    """
    text = _read_text(path)
    stripped = text.lstrip()
    try:
        whole = json.loads(text)
    except json.JSONDecodeError as e:
        first_line = stripped.split("\n", 1)[0]
        if stripped.startswith("[") or (stripped.startswith("{") and not _is_json(first_line)):
            # A JSON array, or one object spread over many lines: the error position is the
            # useful one (JSON Lines would blame line 1).
            raise UserError(
                f"{path}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}; "
                "fix the file (a JSON list of records, or one JSON object per line)"
            ) from e
        whole = None
    if isinstance(whole, list):
        for number, record in enumerate(whole, 1):
            yield f"record {number}", record
        return
    if isinstance(whole, dict):
        yield "record 1", whole
        return
    # JSON Lines: one object per line, blank lines allowed.
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            recs.bad(f"line {number}", f"not valid JSON ({e.msg} at column {e.colno})")
            continue
        yield f"line {number}", record


def _string_field(record: Any, key: str, required: bool = True) -> str | None:
    """``record[key]`` if it is a string; None when missing/wrong type (caller reports it)."""
    if not isinstance(record, dict):
        return None
    value = record.get(key)
    if value is None and not required:
        return ""
    return value if isinstance(value, str) else None


def read_alpaca(path: str | Path, skip_bad: bool = False) -> Conversations:
    """Alpaca JSON list or JSONL of ``{instruction, input, output}``.

    user = instruction, plus ``"\\n\\n" + input`` when input is non-empty; assistant = output.
    ``input`` may be missing; ``instruction`` and ``output`` must be present (an empty output is
    kept, as in the official file, and teaches the model to close the turn).
    """
    path = Path(path)
    recs = _Records(path, "alpaca", skip_bad)
    for where, record in _json_records(path, recs):
        instruction = _string_field(record, "instruction")
        output = _string_field(record, "output")
        extra = _string_field(record, "input", required=False)
        missing = [
            key
            for key, value in (("instruction", instruction), ("output", output), ("input", extra))
            if value is None
        ]
        if missing:
            recs.bad(where, f"missing or non-text {', '.join(repr(k) for k in missing)}")
            continue
        user = instruction.strip()
        if extra.strip():
            user += "\n\n" + extra.strip()
        recs.add([Turn("user", user), Turn("assistant", output.strip())])
    return recs.done()


def read_squad(path: str | Path, skip_bad: bool = False) -> Conversations:
    """SQuAD v1.1 or v2.0 JSON: one conversation per question.

    user = context + ``"\\n\\nQuestion: "`` + question; assistant = the first answer's text (all
    answers are kept in ``Turn.references`` for evaluation). v2.0's unanswerable questions
    (``is_impossible``) get the fixed ``REFUSAL`` reply. Records are numbered by question, in
    file order, in error messages.
    """
    path = Path(path)
    recs = _Records(path, "squad", skip_bad)
    text = _read_text(path)
    try:
        root = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(
            f"{path}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}; "
            "SQuAD files are one JSON object with a 'data' list"
        ) from e
    articles = root.get("data") if isinstance(root, dict) else None
    if not isinstance(articles, list):
        raise UserError(f"{path}: no 'data' list of articles; is this a SQuAD file?")
    number = 0
    for article in articles:
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        for paragraph in paragraphs if isinstance(paragraphs, list) else []:
            context = _string_field(paragraph, "context")
            qas = paragraph.get("qas") if isinstance(paragraph, dict) else None
            for qa in qas if isinstance(qas, list) else []:
                number += 1
                qid = qa.get("id", "?") if isinstance(qa, dict) else "?"
                where = f"question {number} (id {qid})"
                question = _string_field(qa, "question")
                if context is None or question is None:
                    missing = "context" if context is None else "question"
                    recs.bad(where, f"missing or non-text '{missing}'")
                    continue
                user = context.strip() + "\n\nQuestion: " + question.strip()
                if qa.get("is_impossible", False):
                    recs.add([Turn("user", user), Turn("assistant", REFUSAL, (REFUSAL,))])
                    continue
                answers = qa.get("answers")
                texts = [
                    a["text"].strip()
                    for a in (answers if isinstance(answers, list) else [])
                    if isinstance(a, dict) and isinstance(a.get("text"), str) and a["text"].strip()
                ]
                if not texts:
                    recs.bad(where, "no answer text (and not marked is_impossible)")
                    continue
                recs.add([Turn("user", user), Turn("assistant", texts[0], tuple(texts))])
    if number == 0:
        raise UserError(f"{path}: no questions found under data[].paragraphs[].qas")
    return recs.done()


def _alternate(utterances: Sequence[str]) -> Conversation:
    """User, assistant, user, ...; a trailing user line with no reply teaches nothing: dropped."""
    turns = [Turn("user" if i % 2 == 0 else "assistant", text) for i, text in enumerate(utterances)]
    if turns and turns[-1].role == "user":
        turns.pop()
    return turns


def read_dailydialog(path: str | Path, skip_bad: bool = False) -> Conversations:
    """DailyDialog, either form the dataset ships in.

    * original text: one dialogue per line, each utterance ended by ``__eou__``;
    * JSON list / JSONL of records with a ``dialog`` list of strings (the Hugging Face layout).

    Turns alternate user/assistant starting with the user. Text is kept as the dataset wrote it
    (including its spaces before punctuation), only trimmed. A dialogue needs at least two
    utterances; an odd last utterance (a user line with no reply) is dropped.
    """
    path = Path(path)
    recs = _Records(path, "dailydialog", skip_bad)
    text = _read_text(path)
    if text.lstrip().startswith(("{", "[")):
        for where, record in _json_records(path, recs):
            dialog = record.get("dialog") if isinstance(record, dict) else None
            if not isinstance(dialog, list) or not all(isinstance(u, str) for u in dialog):
                recs.bad(where, "missing 'dialog' list of strings")
                continue
            utterances = [u.strip() for u in dialog if u.strip()]
            if len(utterances) < 2:
                recs.bad(where, "a dialogue needs at least two utterances")
                continue
            recs.add(_alternate(utterances))
        return recs.done()
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        utterances = [u.strip() for u in line.split("__eou__") if u.strip()]
        if len(utterances) < 2:
            recs.bad(f"line {number}", "a dialogue needs at least two '__eou__'-ended utterances")
            continue
        recs.add(_alternate(utterances))
    return recs.done()


def read_chat(path: str | Path, skip_bad: bool = False) -> Conversations:
    """Generic chat JSONL (or a JSON list): ``{"messages": [{"role": ..., "content": ...}]}``.

    Roles are system, user, assistant. System messages are prepended (joined by a blank line) to
    the first user turn, since the template has no system slot. A record needs at least one
    assistant message, or nothing would be learnt from it.
    """
    path = Path(path)
    recs = _Records(path, "chat", skip_bad)
    for where, record in _json_records(path, recs):
        messages = record.get("messages") if isinstance(record, dict) else None
        if not isinstance(messages, list) or not messages:
            recs.bad(where, "missing 'messages' list")
            continue
        system: list[str] = []
        turns: Conversation = []
        problem = None
        for index, message in enumerate(messages, 1):
            role = message.get("role") if isinstance(message, dict) else None
            content = _string_field(message, "content")
            if role not in ("system", "user", "assistant"):
                problem = f"message {index} has role {role!r} (expected system, user or assistant)"
                break
            if content is None:
                problem = f"message {index} is missing text 'content'"
                break
            if role == "system":
                system.append(content.strip())
            else:
                turns.append(Turn(role, content.strip()))
        if problem is None and not any(t.role == "assistant" for t in turns):
            problem = "no assistant message"
        if problem is not None:
            recs.bad(where, problem)
            continue
        if system:
            prefix = "\n\n".join(s for s in system if s)
            first_user = next((i for i, t in enumerate(turns) if t.role == "user"), None)
            if first_user is None:
                turns.insert(0, Turn("user", prefix))
            elif prefix:
                turns[first_user] = Turn("user", prefix + "\n\n" + turns[first_user].content)
        recs.add(turns)
    return recs.done()


def read_stories_qa(
    path: str | Path, skip_bad: bool = False, questions_per_story: int = 1, seed: int = 0
) -> Conversations:
    """lmforge's built-in story Q&A JSONL: ``{"story", "question", "answer", "story_index"}``.

    user = story + ``"\\n"`` + question; assistant = answer. With ``questions_per_story`` N > 1,
    the questions about one story (consecutive records with the same story) are asked N to a
    conversation, in a seeded shuffled order: the first with the story, the rest as follow-up
    turns, as a user would ask them in ``lmforge chat``. The story is then read once for up to N
    answers, so a training step learns from N times the answer tokens for little more compute.
    """
    path = Path(path)
    recs = _Records(path, "stories-qa", skip_bad)
    groups: list[tuple[str, list[tuple[str, str]]]] = []
    for where, record in _json_records(path, recs):
        values = {key: _string_field(record, key) for key in ("story", "question", "answer")}
        missing = [key for key, value in values.items() if value is None]
        if missing:
            recs.bad(where, f"missing or non-text {', '.join(repr(k) for k in missing)}")
            continue
        story = values["story"].strip()
        pair = (values["question"].strip(), values["answer"].strip())
        if groups and groups[-1][0] == story and questions_per_story > 1:
            groups[-1][1].append(pair)
        else:
            groups.append((story, [pair]))
    rng = np.random.default_rng([seed, 11])
    for story, pairs in groups:
        order = rng.permutation(len(pairs)) if len(pairs) > 1 else [0]
        for first in range(0, len(pairs), questions_per_story):
            turns: Conversation = []
            for k in order[first : first + questions_per_story]:
                question, answer = pairs[k]
                user = question if turns else story + "\n" + question
                turns += [Turn("user", user), Turn("assistant", answer)]
            recs.add(turns)
    return recs.done()


def read_plain_text(path: str | Path) -> Conversations:
    """Plain text for SFT only with ``--sft.allow_plain_text=true``: each document (split on
    ``<|endoftext|>`` lines, else on blank lines) becomes one assistant turn, all of it trained."""
    path = Path(path)
    text = _read_text(path)
    separator = r"^\s*<\|endoftext\|>\s*$" if "<|endoftext|>" in text else r"\n\s*\n"
    parts = [p.strip() for p in re.split(separator, text, flags=re.MULTILINE)]
    return Conversations([[Turn("assistant", p)] for p in parts if p])


READERS: dict[str, Callable[..., Conversations]] = {
    "alpaca": read_alpaca,
    "squad": read_squad,
    "dailydialog": read_dailydialog,
    "chat": read_chat,
    "stories-qa": read_stories_qa,
}


# --------------------------------------------------------------------------------------------
# Detecting formats and mixing sources
# --------------------------------------------------------------------------------------------

_JSON_KEY = re.compile(r'"([A-Za-z_]+)"\s*:')


def detect_format(path: str | Path) -> str:
    """The instruction format of a file, judged from its content (the extension is not trusted).

    Returns one of ``FORMATS``, ``"text"`` for plain text, or ``"binary"`` for non-text files
    (for example prepared ``.bin`` token files). Raises UserError for a missing/empty file and for
    JSON whose keys match no known format.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; check the path in the data spec")
    with open(path, "rb") as f:
        head_bytes = f.read(1 << 20)  # the first MiB tells the formats apart
    if not head_bytes.strip():
        raise UserError(f"{path} is empty; give a file with at least one record")
    if b"\x00" in head_bytes:
        return "binary"
    head = head_bytes.decode("utf-8-sig", errors="replace")
    if head.lstrip().startswith(("{", "[")):
        keys = set(_JSON_KEY.findall(head[:65536]))
        # Checked from most to least specific: SQuAD also has "question"/"answers".
        if "messages" in keys:
            return "chat"
        if "dialog" in keys:
            return "dailydialog"
        if {"qas", "paragraphs"} & keys:
            return "squad"
        if {"instruction", "output"} <= keys:
            return "alpaca"
        if {"story", "question", "answer"} <= keys:
            return "stories-qa"
        if keys:
            shown = ", ".join(sorted(keys)[:8])
            raise UserError(
                f"{path}: JSON with keys {shown} matches no instruction format; "
                f"name it as FORMAT:PATH with FORMAT one of {', '.join(FORMATS)}"
            )
    if "__eou__" in head:
        return "dailydialog"
    return "text"


def looks_like_instruction_data(path: str | Path) -> bool:
    """True when ``path`` (a file, or any file in a folder) is in an instruction format.

    Phase 1 (``lmforge train``/``prepare``) uses this to refuse SFT data; it never raises.
    """
    path = Path(path)
    files = _files_in(path) if path.is_dir() else [path]
    for file in files:
        try:
            if detect_format(file) in FORMATS:
                return True
        except UserError:
            continue
    return False


def _files_in(folder: Path) -> list[Path]:
    """Regular, non-hidden files under ``folder``, recursively, in sorted order."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _parse_spec_item(item: str) -> tuple[str | None, Path]:
    """``"FORMAT:PATH"`` or ``"PATH"``; only a known format name counts as a prefix (so that
    ``C:\\data`` stays a path)."""
    prefix, sep, rest = item.partition(":")
    if sep and prefix.strip().lower() in FORMATS:
        if not rest.strip():
            raise UserError(f"{item!r} names a format but no file: write FORMAT:PATH")
        return prefix.strip().lower(), Path(rest.strip()).expanduser()
    if sep and re.fullmatch(r"[A-Za-z][\w-]+", prefix) and not Path(item).exists():
        raise UserError(
            f"unknown data format {prefix!r} in {item!r}; use one of {', '.join(FORMATS)}"
        )
    return None, Path(item.strip()).expanduser()


def _read(
    fmt: str, path: Path, skip_bad: bool, questions_per_story: int, seed: int
) -> Conversations:
    if fmt == "stories-qa":
        return read_stories_qa(path, skip_bad, questions_per_story, seed)
    return READERS[fmt](path, skip_bad=skip_bad)


def _read_source(
    fmt: str | None,
    path: Path,
    skip_bad: bool,
    allow_plain_text: bool,
    questions_per_story: int = 1,
    seed: int = 0,
) -> tuple[Conversations, str]:
    """Read one spec entry (a file or a folder) and name the format(s) it was read as."""
    if path.is_dir():
        files = _files_in(path)
        out = Conversations()
        formats = []
        for file in files:
            found = detect_format(file) if fmt is None else fmt
            if found == "text" and allow_plain_text:
                part = read_plain_text(file)
            elif found not in FORMATS:
                log.info("%s: not instruction data (%s), skipped", file, found)
                continue
            else:
                part = _read(found, file, skip_bad, questions_per_story, seed)
            out.extend(part)
            out.skipped += part.skipped
            formats.append(found)
        if not out:
            raise UserError(
                f"{path} holds no instruction data files; {_PLAIN_TEXT_HINT}"
                if files
                else f"{path} is an empty folder; put data files in it or name the files"
            )
        return out, "+".join(sorted(set(formats)))
    if fmt is None:
        fmt = detect_format(path)
    if fmt == "binary":
        raise UserError(
            f"{path} is a binary file (prepared tokens?), not instruction data; name the "
            f"JSON/JSONL/text file instead, in one of the formats {', '.join(FORMATS)}"
        )
    if fmt == "text":
        if not allow_plain_text:
            raise UserError(f"{path} looks like plain text; {_PLAIN_TEXT_HINT}")
        return read_plain_text(path), "text"
    return _read(fmt, path, skip_bad, questions_per_story, seed), fmt


def _parse_weights(weights: str | Sequence[float] | None, n_sources: int) -> list[float]:
    if weights is None or (isinstance(weights, str) and not weights.strip()):
        return [1.0] * n_sources
    items = weights.split(",") if isinstance(weights, str) else list(weights)
    try:
        values = [float(w) for w in items]
    except ValueError as e:
        raise UserError(f"weights {weights!r} must be comma-separated numbers, e.g. 1,0.5") from e
    if len(values) != n_sources:
        raise UserError(
            f"{len(values)} weights given for {n_sources} data sources; "
            "give one weight per comma-separated source"
        )
    if any(not math.isfinite(w) or w < 0 for w in values) or not any(values):
        raise UserError(f"weights {weights!r} must be >= 0 and not all zero")
    return values


def _mix(n: int, weight: float, rng: np.random.Generator) -> list[int]:
    """Indices of a source's records to use: ``round(weight * n)`` of them.

    Weight <= 1 takes a seeded sample without replacement. Weight > 1 repeats the whole source
    ``floor`` times and adds a seeded sample of the remainder, so that each record appears at
    least ``floor(weight)`` times (lower variance than drawing everything with replacement).
    Indices come back sorted so the mixed data keeps file order; shuffling is the batcher's job.
    """
    want = round(weight * n)
    full, rest = divmod(want, n)
    chosen = list(range(n)) * full
    chosen += rng.choice(n, size=rest, replace=False).tolist() if rest else []
    return sorted(chosen)


def load_sources(
    spec: str,
    weights: str | Sequence[float] | None = None,
    skip_bad: bool = False,
    seed: int = 0,
    allow_plain_text: bool = False,
    questions_per_story: int = 1,
) -> Conversations:
    """Read and mix the conversations named by ``spec``.

    ``spec`` is comma-separated files or folders, each optionally ``FORMAT:PATH`` with FORMAT in
    ``FORMATS`` (otherwise ``detect_format`` decides per file; in a folder, files that are not
    instruction data are skipped). ``weights`` (comma-separated, one per spec entry; default all 1)
    makes source ``i`` contribute ``round(w_i * len_i)`` conversations, sampled with numpy seeded
    by ``(seed, i)`` -- see ``_mix``. Plain text is refused unless ``allow_plain_text``.
    ``questions_per_story`` groups the built-in story Q&A (see ``read_stories_qa``).
    The result's ``skipped`` and ``sources`` say what was read.
    """
    items = [item.strip() for item in spec.split(",") if item.strip()]
    if not items:
        raise UserError("no instruction data given; name files or folders, comma-separated")
    values = _parse_weights(weights, len(items))
    mixed = Conversations()
    for index, (item, weight) in enumerate(zip(items, values)):
        fmt, path = _parse_spec_item(item)
        if not path.exists():
            raise UserError(f"{path} does not exist; check the path in the data spec")
        conversations, found = _read_source(
            fmt, path, skip_bad, allow_plain_text, questions_per_story, seed
        )
        chosen = _mix(len(conversations), weight, np.random.default_rng([seed, index]))
        mixed.extend(conversations[i] for i in chosen)
        mixed.skipped += conversations.skipped
        mixed.sources.append(
            SourceSummary(
                str(path), found, len(conversations), conversations.skipped, weight, len(chosen)
            )
        )
    if not mixed:
        raise UserError("the data weights leave no examples; raise a weight above 0")
    return mixed


def check_data_tokenizer(spec: str, identity: dict[str, Any]) -> None:
    """Refuse prepared token folders (already tokenized, no roles) and files that sit in a folder
    prepared with another tokenizer than the model's; raw instruction files are encoded with the
    model's tokenizer."""
    from lmforge.tokenizers import check_same_tokenizer

    for item in (s.strip() for s in spec.split(",") if s.strip()):
        _, path = _parse_spec_item(item)
        if path.is_dir() and (path / "meta.json").is_file():
            raise UserError(
                f"{path} is a prepared token folder (train.bin): instruction data is read from "
                f"JSON/JSONL files; name them, e.g. stories-qa:{path / 'qa_train.jsonl'}"
            )
        meta = path.parent / "meta.json"
        if not path.is_file() or not meta.is_file():
            continue
        try:
            declared = json.loads(meta.read_text(encoding="utf-8")).get("tokenizer")
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            continue
        if declared:
            check_same_tokenizer(identity, declared, f"the model and {meta}")


# --------------------------------------------------------------------------------------------
# The template and its loss labels
# --------------------------------------------------------------------------------------------


@dataclass
class Rendered:
    """Conversations rendered for training, and what rendering left out."""

    examples: list[Example] = field(default_factory=list)
    dropped: int = 0
    """Conversations whose every assistant token fell beyond ``max_len``."""
    tokens: int = 0
    """Total ids in ``examples``."""
    target_tokens: int = 0
    """Total positions with a label (what the loss is averaged over)."""


def render_all(
    conversations: Iterable[Conversation], tokenizer: Any, max_len: int | None = None
) -> Rendered:
    """``render`` each conversation; drop (and count) those truncated to no labels at all."""
    out = Rendered()
    for conversation in conversations:
        ids, labels = render(conversation, tokenizer, max_len)
        n_targets = sum(1 for label in labels if label != IGNORE_INDEX)
        if n_targets == 0:
            out.dropped += 1
            continue
        out.examples.append((ids, labels))
        out.tokens += len(ids)
        out.target_tokens += n_targets
    return out


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


def _truncate(example: Example, max_len: int | None) -> Example:
    ids, labels = example
    if max_len is None or len(ids) <= max_len:
        return ids, labels
    labels = labels[:max_len]
    labels[-1] = IGNORE_INDEX  # its target was cut away (keeps labels[i] == ids[i+1])
    return ids[:max_len], labels


def pad_batch(
    examples: Sequence[Example], pad_id: int, max_len: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad examples to the longest one (capped at ``max_len``).

    Returns LongTensors of shape (B, T): ``input_ids`` (``pad_id`` on padding), ``labels``
    (-100 on padding) and ``attention_mask`` (1 for real tokens, 0 for padding). With right
    padding, plain causal attention already keeps real tokens from seeing padding.
    """
    import torch

    examples = [_truncate(e, max_len) for e in examples]
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[row, : len(labs)] = torch.tensor(labs, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def pack_examples(
    examples: Sequence[Example], seq_len: int, pad_id: int
) -> list[dict[str, torch.Tensor]]:
    """Pack examples into rows of exactly ``seq_len`` tokens (best fit, deterministic).

    Each example goes whole into the fullest row that still has room (a new row if none has);
    examples longer than ``seq_len`` are truncated. Each row is a dict of 1-D LongTensors of
    length ``seq_len``: ``input_ids``, ``labels``, ``position_ids`` (restarting at 0 for each
    example, so positions match the example alone) and ``doc_ids`` (0, 1, ... per example in the
    row, -1 on padding), which keep attention inside each example. Examples keep their order
    within a row.
    """
    import torch

    rows: list[list[Example]] = []
    used: list[int] = []
    # Sorted (room_left, row) pairs: bisect finds the tightest row that fits in O(log rows).
    open_rows: list[tuple[int, int]] = []
    for example in examples:
        example = _truncate(example, seq_len)
        size = len(example[0])
        if size == 0:
            continue
        at = bisect.bisect_left(open_rows, (size, -1))
        if at < len(open_rows):
            room, row = open_rows.pop(at)
        else:
            room, row = seq_len, len(rows)
            rows.append([])
            used.append(0)
        rows[row].append(example)
        used[row] += size
        if room - size > 0:
            bisect.insort(open_rows, (room - size, row))
    packed = []
    for row_examples in rows:
        input_ids = torch.full((seq_len,), pad_id, dtype=torch.long)
        labels = torch.full((seq_len,), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros(seq_len, dtype=torch.long)
        doc_ids = torch.full((seq_len,), -1, dtype=torch.long)
        start = 0
        for doc, (ids, labs) in enumerate(row_examples):
            end = start + len(ids)
            input_ids[start:end] = torch.tensor(ids, dtype=torch.long)
            labels[start:end] = torch.tensor(labs, dtype=torch.long)
            position_ids[start:end] = torch.arange(len(ids))
            doc_ids[start:end] = doc
            start = end
        packed.append(
            {
                "input_ids": input_ids,
                "labels": labels,
                "position_ids": position_ids,
                "doc_ids": doc_ids,
            }
        )
    return packed


class SFTBatches:
    """Deterministic, resumable batches for instruction tuning.

    The batch for ``(epoch, index)`` is a pure function of ``(seed, epoch, index)``: each epoch
    shuffles the units (examples, or packed rows when ``pack=True``) with numpy seeded by
    ``(seed, epoch)``. Resuming therefore needs only the step counter, and ``state_dict`` just
    fingerprints the data so a resume with different data is refused. The last batch of an epoch
    may be smaller than ``batch_size``.

    Unpacked batches come from ``pad_batch`` (``input_ids``, ``labels``, ``attention_mask``);
    packed batches have ``input_ids``, ``labels``, ``position_ids``, ``doc_ids`` (B, seq_len),
    which the model turns into a mask that keeps attention inside each example.
    """

    def __init__(
        self,
        examples: Sequence[Example],
        batch_size: int,
        seed: int = 0,
        *,
        pad_id: int,
        pack: bool = False,
        seq_len: int | None = None,
    ) -> None:
        """``seq_len`` is the row length when packing and the maximum length when padding."""
        if batch_size < 1:
            raise UserError(f"batch_size must be at least 1, not {batch_size}")
        if not examples:
            raise UserError("no training examples to batch; check the data and max_len")
        if pack and not seq_len:
            raise UserError("packing needs a sequence length; set seq_len (e.g. the model's)")
        self.batch_size, self.seed, self.pad_id = batch_size, seed, pad_id
        self.pack, self.seq_len = pack, seq_len
        self.units: list[Any] = pack_examples(examples, seq_len, pad_id) if pack else list(examples)
        self.batches_per_epoch = math.ceil(len(self.units) / batch_size)
        # Fingerprint of the data, checked on resume (cheaper than hashing every id).
        self._data = {"examples": len(examples), "tokens": sum(len(ids) for ids, _ in examples)}

    def __len__(self) -> int:
        return self.batches_per_epoch

    def order(self, epoch: int) -> np.ndarray:
        """The shuffled unit order of one epoch."""
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.units))

    def batch(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        """Batch number ``index`` (0-based) of ``epoch``."""
        if not 0 <= index < self.batches_per_epoch:
            raise IndexError(f"batch {index} out of range 0..{self.batches_per_epoch - 1}")
        import torch

        picked = self.order(epoch)[index * self.batch_size : (index + 1) * self.batch_size]
        if self.pack:
            rows = [self.units[i] for i in picked]
            return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}
        return pad_batch([self.units[i] for i in picked], self.pad_id, self.seq_len)

    def locate(self, step: int, micro_step: int = 0, grad_accum: int = 1) -> tuple[int, int]:
        """``(epoch, index)`` of micro-batch ``micro_step`` of optimizer step ``step``.

        Micro-batches are consumed consecutively across steps and epochs, so step ``s`` with
        accumulation ``g`` uses global micro-batches ``s*g .. s*g + g - 1``.
        """
        flat = step * grad_accum + micro_step
        return divmod(flat, self.batches_per_epoch)

    def get(self, step: int, micro_step: int = 0, grad_accum: int = 1) -> dict[str, torch.Tensor]:
        """The micro-batch the trainer needs at ``(step, micro_step)``."""
        return self.batch(*self.locate(step, micro_step, grad_accum))

    def epoch_batches(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        """All batches of one epoch, in order (validation uses this with any fixed epoch)."""
        for index in range(self.batches_per_epoch):
            yield self.batch(epoch, index)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to check that a resume sees the same data and batching."""
        return {
            "seed": self.seed,
            "batch_size": self.batch_size,
            "pack": self.pack,
            "seq_len": self.seq_len,
            **self._data,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Refuse to resume when the data or batching changed (the order would silently differ)."""
        mine = self.state_dict()
        changed = [key for key in mine if key in state and state[key] != mine[key]]
        if changed:
            details = ", ".join(f"{k} {state[k]} -> {mine[k]}" for k in changed)
            raise UserError(
                f"the SFT data or batching changed since the checkpoint ({details}); "
                "resume with the same data and settings, or start a new run"
            )
