"""`lmforge eval`: how good is a checkpoint, on prepared tokens or on question/answer data.

* A prepared folder (meta.json + val.bin): loss and perplexity over its non-overlapping windows
  (`token_eval`).
* Instruction data (SQuAD, Alpaca, story Q&A, chat, DailyDialog files): the model answers each
  conversation's last user turn greedily (prompt from `render_prompt`, as in chat); exact match
  and F1 with SQuAD's normalisation, accuracy for the built-in story Q&A, and ROUGE-L/BLEU when
  asked for (`qa_eval`). Scores are in percent.

Exact match and F1 follow SQuAD's official evaluation script (v2.0, which equals v1.1 except that
an empty prediction or gold scores F1 = 1 when both are empty, instead of 0). ROUGE-L and BLEU
come from the libraries the field reports with (``rouge_score``, ``sacrebleu``); they are an
optional extra (``pip install 'lmforge[eval]'``) and are imported only when used.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lmforge.errors import UserError

if TYPE_CHECKING:
    from lmforge.generate import LoadedModel

BASE_METRICS = ("em", "f1", "accuracy")
OPTIONAL_METRICS = ("rouge", "bleu")

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, drop punctuation, drop a/an/the, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _golds(golds: str | Sequence[str]) -> list[str]:
    return [golds] if isinstance(golds, str) else list(golds)


def exact_match(prediction: str, golds: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer, else 0.0."""
    normalized = normalize_answer(prediction)
    return float(any(normalized == normalize_answer(gold) for gold in _golds(golds)))


def _f1_one(prediction: str, gold: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        # Official v2.0 rule: both empty (a correct "no answer") is a match.
        return float(pred_tokens == gold_tokens)
    common = Counter(pred_tokens) & Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1(prediction: str, golds: str | Sequence[str]) -> float:
    """Token-level F1 of the normalised answers, the maximum over the gold answers."""
    golds = _golds(golds)
    return max((_f1_one(prediction, gold) for gold in golds), default=0.0)


def story_accuracy(prediction: str, gold: str) -> float:
    """Built-in story Q&A: 1.0 when the normalised answer equals the normalised gold."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def _optional(module: str, package: str, metric: str) -> Any:
    """Import an optional metrics library, or say how to install it."""
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as e:
        raise UserError(
            f"{metric} needs the optional package {package!r}; "
            f"install it with: pip install 'lmforge[eval]' (or pip install {package})"
        ) from e


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure in [0, 1] (``rouge_score``, Porter stemming as in its common use)."""
    rouge_scorer = _optional("rouge_score.rouge_scorer", "rouge-score", "ROUGE-L")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return scorer.score(reference, prediction)["rougeL"].fmeasure


def bleu(prediction: str, reference: str | Sequence[str]) -> float:
    """Sentence BLEU in [0, 100] from ``sacrebleu`` (its defaults: 13a tokenisation,
    exponential smoothing). For a whole test set prefer ``corpus_bleu``: BLEU is defined over a
    corpus, and averaging sentence scores is noisier."""
    sacrebleu = _optional("sacrebleu", "sacrebleu", "BLEU")
    return sacrebleu.sentence_bleu(prediction, _golds(reference)).score


def corpus_bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU in [0, 100] from ``sacrebleu``, one reference per prediction."""
    sacrebleu = _optional("sacrebleu", "sacrebleu", "BLEU")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    return sacrebleu.corpus_bleu(list(predictions), [list(references)]).score


def parse_metrics(spec: str) -> list[str]:
    """The asked-for metrics; optional libraries are checked now, before any work."""
    names = [m.strip().lower() for m in spec.split(",") if m.strip()]
    unknown = [m for m in names if m not in BASE_METRICS + OPTIONAL_METRICS]
    if unknown or not names:
        raise UserError(
            f"--metrics: unknown metric {unknown[0] if unknown else '(none)'}; "
            f"choose from {', '.join(BASE_METRICS + OPTIONAL_METRICS)}"
        )
    if "rouge" in names:
        _optional("rouge_score.rouge_scorer", "rouge-score", "ROUGE-L")
    if "bleu" in names:
        _optional("sacrebleu", "sacrebleu", "BLEU")
    return names


# ------------------------------------------------------------------------------------ tokens
@torch.no_grad()
def token_eval(
    loaded: LoadedModel, folder: Path, split: str, limit: int, batch_size: int
) -> dict[str, Any]:
    """Mean next-token loss over the non-overlapping windows of a prepared token file."""
    from lmforge.data.memmap import read_meta
    from lmforge.tokenizers import check_same_tokenizer

    meta = read_meta(folder)
    check_same_tokenizer(
        loaded.tokenizer_identity,
        meta.get("tokenizer", {}),
        f"the checkpoint and {folder / 'meta.json'}",
    )
    tokens = np.memmap(folder / f"{split}.bin", dtype=np.dtype(meta["dtype"]), mode="r")
    if len(tokens) < 2:
        raise UserError(f"{folder / f'{split}.bin'} holds fewer than 2 tokens: nothing to score")
    width = min(loaded.context, len(tokens) - 1)
    starts = np.arange(0, len(tokens) - width, width)
    if limit:
        starts = starts[:limit]
    device = next(loaded.model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(starts), batch_size):
        index = starts[i : i + batch_size, None] + np.arange(width + 1)  # (B, T+1)
        windows = torch.from_numpy(tokens[index].astype(np.int64)).to(device)
        total += loaded.model(windows[:, :-1], windows[:, 1:], reduction="sum").item()
        count += windows[:, 1:].numel()
    loss = total / count
    return {
        "kind": "tokens",
        "checkpoint": loaded.path,
        "phase": loaded.phase,
        "data": str(folder),
        "split": split,
        "windows": len(starts),
        "tokens": count,
        "metrics": {"loss": loss, "perplexity": math.exp(min(loss, 50.0))},
        "entropy_floor": meta.get("entropy_floor_nats_per_token"),
    }


# -------------------------------------------------------------------------------------- Q&A
@dataclass
class Question:
    """One conversation to answer: the prompt ids and the accepted answers."""

    prompt: list[int]
    references: tuple[str, ...]
    format: str
    question: str


def load_questions(
    loaded: LoadedModel, spec: str, limit: int, budget: int, skip_bad: bool
) -> list[Question]:
    """Prompt = the conversation up to its last assistant turn; that turn is the gold answer."""
    from lmforge.chat_format import render_prompt
    from lmforge.data.instruct import check_data_tokenizer, load_sources

    check_data_tokenizer(spec, loaded.tokenizer_identity)
    conversations = load_sources(spec, skip_bad=skip_bad)
    formats = [src.format for src in conversations.sources for _ in range(src.used)]
    questions = []
    for conversation, fmt in zip(conversations, formats):
        last = max(i for i, turn in enumerate(conversation) if turn.role == "assistant")
        gold = conversation[last]
        asked = conversation[:last]
        prompt = render_prompt(asked, loaded.tokenizer)[-budget:]  # keep the question's end
        question = asked[-1].content.rsplit("\n", 1)[-1] if asked else ""
        questions.append(Question(prompt, gold.references or (gold.content,), fmt, question))
        if limit and len(questions) >= limit:
            break
    return questions


@torch.no_grad()
def answer_all(
    loaded: LoadedModel, questions: list[Question], max_new_tokens: int, batch_size: int
) -> list[str]:
    """Greedy answers, several prompts at a time (left-padded by `generate`)."""
    from lmforge.chat_format import chat_ids

    tok = loaded.tokenizer
    pad = chat_ids(tok).pad
    answers: list[str] = []
    for i in range(0, len(questions), batch_size):
        prompts = [q.prompt for q in questions[i : i + batch_size]]
        outputs = loaded.model.generate(
            prompts,
            max_new_tokens,
            temperature=0.0,
            stop_tokens=loaded.stop_tokens(chat=True),
            vocab_limit=loaded.vocab_limit,
            pad_id=pad,
        )
        for ids in outputs:
            text = tok.decode(ids).strip()
            if not loaded.instruction_tuned:
                # A phase-1 model never learnt <|end|>: score its first line as the answer.
                text = text.split("\n", 1)[0].strip()
            answers.append(text)
    return answers


def score(questions: list[Question], answers: list[str], metrics: list[str]) -> dict[str, float]:
    """Mean scores in percent over the examples each metric applies to."""
    out: dict[str, float] = {}
    if "em" in metrics:
        out["exact_match"] = _mean(
            [exact_match(a, q.references) for q, a in zip(questions, answers)]
        )
    if "f1" in metrics:
        out["f1"] = _mean([f1(a, q.references) for q, a in zip(questions, answers)])
    stories = [(q, a) for q, a in zip(questions, answers) if q.format == "stories-qa"]
    if "accuracy" in metrics and stories:
        out["accuracy"] = _mean([story_accuracy(a, q.references[0]) for q, a in stories])
    if "rouge" in metrics:
        out["rouge_l"] = _mean([rouge_l(a, q.references[0]) for q, a in zip(questions, answers)])
    if "bleu" in metrics:
        out["bleu"] = corpus_bleu(answers, [q.references[0] for q in questions])
    return out


def story_accuracy_by_kind(questions: list[Question], answers: list[str]) -> dict[str, Any]:
    """Built-in story Q&A: accuracy per kind of question, which says what the model cannot do
    yet (a lookup it has not learnt shows as one kind near chance while the others are high)."""
    from lmforge.data.stories import question_kind

    kinds: dict[str, list[float]] = {}
    for q, a in zip(questions, answers):
        if q.format == "stories-qa":
            right = story_accuracy(a, q.references[0])
            kinds.setdefault(question_kind(q.question), []).append(right)
    return {kind: {"examples": len(v), "accuracy": _mean(v)} for kind, v in sorted(kinds.items())}


def _mean(values: list[float]) -> float:
    return 100.0 * sum(values) / len(values) if values else 0.0


def qa_eval(loaded: LoadedModel, data: str, metrics: list[str], limit: int = 0,
            max_new_tokens: int = 32, batch_size: int = 16, skip_bad: bool = False,
            show: int = 3) -> dict[str, Any]:  # fmt: skip
    """Greedy answers to every conversation's last user turn, scored by `metrics`."""
    budget = loaded.context - max_new_tokens
    if budget < 8:
        raise UserError(
            f"--max-new-tokens {max_new_tokens} leaves no room for the prompt "
            f"in the model's context of {loaded.context} tokens; lower it"
        )
    questions = load_questions(loaded, data, limit, budget, skip_bad)
    answers = answer_all(loaded, questions, max_new_tokens, batch_size)
    formats = sorted({q.format for q in questions})
    per_format = {}
    if len(formats) > 1:
        for fmt in formats:
            pairs = [(q, a) for q, a in zip(questions, answers) if q.format == fmt]
            per_format[fmt] = {
                "examples": len(pairs),
                **score([q for q, _ in pairs], [a for _, a in pairs], metrics),
            }
    return {
        "kind": "qa",
        "checkpoint": loaded.path,
        "phase": loaded.phase,
        "data": data,
        "examples": len(questions),
        "max_new_tokens": max_new_tokens,
        "metrics": score(questions, answers, metrics),
        "per_format": per_format,
        "per_question": story_accuracy_by_kind(questions, answers),
        "shown": show,
        "predictions": [
            {
                "question": q.question,
                "references": list(q.references),
                "prediction": a,
                "format": q.format,
            }
            for q, a in zip(questions, answers)
        ],
    }
