"""Answer-quality metrics for ``lmforge eval``: SQuAD exact match / F1, story accuracy,
ROUGE-L and BLEU.

Exact match and F1 follow SQuAD's official evaluation script (v2.0, which equals v1.1 except that
an empty prediction or gold scores F1 = 1 when both are empty, instead of 0). ROUGE-L and BLEU
come from the libraries the field reports with (``rouge_score``, ``sacrebleu``); they are an
optional extra (``pip install 'lmforge[eval]'``) and are imported only when used.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from typing import Any

from lmforge.errors import UserError

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
