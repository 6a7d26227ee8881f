"""Answer metrics: SQuAD normalisation, EM and F1 as the official script, story accuracy,
ROUGE-L/BLEU through the optional libraries."""

from __future__ import annotations

import re
import string
import sys
from collections import Counter

import pytest

from lmforge.errors import UserError
from lmforge.evaluate import (
    bleu,
    corpus_bleu,
    exact_match,
    f1,
    normalize_answer,
    rouge_l,
    story_accuracy,
)


# The official SQuAD v1.1 evaluation functions, verbatim in substance, as the reference.
def official_normalize_answer(s):
    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    def lower(text):
        return text.lower()

    return white_space_fix(remove_articles(remove_punc(lower(s))))


def official_f1_score(prediction, ground_truth):
    prediction_tokens = official_normalize_answer(prediction).split()
    ground_truth_tokens = official_normalize_answer(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def official_metric_max_over_ground_truths(metric_fn, prediction, ground_truths):
    return max(metric_fn(prediction, gt) for gt in ground_truths)


def test_normalisation():
    assert normalize_answer("The Cat!") == "cat"
    assert normalize_answer("  An  apple, a day.  ") == "apple day"
    assert normalize_answer("Theatre") == "theatre"  # 'the' only as a word
    assert normalize_answer("Denver Broncos") == normalize_answer("the denver broncos.")
    assert normalize_answer("10th-century") == "10thcentury"  # punctuation removed, not spaced


CASES = [
    ("Denver Broncos", ["Denver Broncos", "Denver Broncos", "Denver Broncos"]),
    ("the Denver Broncos!", ["Denver Broncos"]),
    ("in the 10th century", ["10th and 11th centuries", "in the 10th and 11th centuries"]),
    ("in the 10th century", ["10th century", "in the 10th and 11th centuries"]),
    ("the cat sat on the mat", ["cat on mat"]),
    ("Santa Clara, California", ["Levi's Stadium", "Levi's Stadium in the San Francisco Bay Area"]),
    ("France", ["France", "France", "france"]),
    ("1, 2, 2", ["2 2 3"]),
]


@pytest.mark.parametrize("prediction, golds", CASES)
def test_em_and_f1_match_the_official_script(prediction, golds):
    def official_em(p, g):
        return official_normalize_answer(p) == official_normalize_answer(g)

    expected_em = official_metric_max_over_ground_truths(official_em, prediction, golds)
    expected_f1 = official_metric_max_over_ground_truths(official_f1_score, prediction, golds)
    assert exact_match(prediction, golds) == float(expected_em)
    assert f1(prediction, golds) == pytest.approx(expected_f1, abs=1e-12)


def test_known_values():
    assert exact_match("the Denver Broncos!", "Denver Broncos") == 1.0
    assert exact_match("Broncos", ["Denver Broncos"]) == 0.0
    assert f1("the cat sat on the mat", "cat on mat") == pytest.approx(6 / 7)  # P 3/4, R 1
    assert f1("in the 10th century", ["10th century", "in the 10th and 11th centuries"]) == (
        pytest.approx(0.8)
    )
    assert f1("1, 2, 2", "2 2 3") == pytest.approx(2 / 3)  # counts overlap: min(2, 2) of "2"
    # v2.0 rule for empty answers (a correct "no answer" scores 1).
    assert f1("", "") == 1.0 and f1("", "x") == 0.0 and f1("the", "x") == 0.0


def test_story_accuracy():
    assert story_accuracy("Mia.", "mia") == 1.0
    assert story_accuracy("On the mat", "on the mat") == 1.0
    assert story_accuracy("the red ball", "ball") == 0.0


def test_rouge_and_bleu_with_the_libraries():
    pytest.importorskip("rouge_score")
    pytest.importorskip("sacrebleu")
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    assert 0.0 < rouge_l("the cat sat", "the cat sat on the mat") < 1.0
    assert bleu("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(100.0)
    assert bleu("a dog ran", "the cat sat on the mat") < 10.0
    refs = ["the cat sat on the mat", "it is raining today"]
    assert corpus_bleu(refs, refs) == pytest.approx(100.0)


@pytest.mark.parametrize("module, call", [("rouge_score", rouge_l), ("sacrebleu", bleu)])
def test_missing_library_names_the_extra(monkeypatch, module, call):
    # A None entry in sys.modules makes `import module` raise ImportError.
    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.setitem(sys.modules, module + ".rouge_scorer", None)
    with pytest.raises(UserError, match=r"pip install 'lmforge\[eval\]'"):
        call("a", "b")
