"""The optional extras, read back by their own libraries: TensorBoard scalars against the CSV,
ROUGE-L and BLEU against scores computed by hand.

Without the packages these tests skip, except under `.ci/run` (LMFORGE_STRICT_EXTRAS=1), where
`make install` has installed the `test` extra and a missing package is a failure.
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.evaluate import bleu, corpus_bleu, rouge_l


def need(module: str):
    """Import an optional package: skip without it, unless CI says it must be there."""
    if os.environ.get("LMFORGE_STRICT_EXTRAS") == "1":
        return __import__(module, fromlist=["_"])
    return pytest.importorskip(module)


# ------------------------------------------------------------------------------ TensorBoard


def lmforge(*args: str | Path) -> None:
    subprocess.run([sys.executable, "-m", "lmforge", *map(str, args)], check=True,
                   capture_output=True, text=True, timeout=600)  # fmt: skip


@pytest.fixture(scope="module")
def tensorboard_run(tmp_path_factory) -> Path:
    need("tensorboard")
    root = tmp_path_factory.mktemp("tensorboard")
    data, run = root / "data", root / "run"
    lmforge("prepare", "--builtin", "stories", "--size-mb", "0.1", "--out", data)
    lmforge("train", f"--data.dir={data}", f"--run.dir={run}", "--model.n_layers=2",
            "--model.dim=32", "--model.n_heads=2", "--model.context=64", "--train.batch_size=4",
            "--train.max_steps=30", "--train.sample_every=0", "--log.plot_every=0",
            "--train.warmup_passes=0", "--train.eval_every=15", "--train.eval_batches=2",
            "--train.save_every_minutes=0", "--log.tensorboard=true")  # fmt: skip
    return run


def test_tensorboard_scalars_equal_the_csv(tensorboard_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with open(tensorboard_run / "logs" / "training_metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    expected: dict[str, list[tuple[int, float]]] = {}
    for column in rows[0]:
        if column == "step":
            continue
        tag = f"val/{column[4:]}" if column.startswith("val_") else f"train/{column}"
        points = [(int(r["step"]), float(r[column])) for r in rows if r[column] != ""]
        if points:
            expected[tag] = points

    events = EventAccumulator(str(tensorboard_run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    assert sorted(tags) == sorted(expected)
    assert {"train/loss", "train/lr", "val/loss", "val/ppl"} <= set(tags)
    for tag, points in expected.items():
        read = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [step for step, _ in read] == [step for step, _ in points], tag
        # The CSV keeps 6 significant digits, TensorBoard a float32.
        for (_, got), (_, want) in zip(read, points):
            assert got == pytest.approx(want, rel=1e-5, abs=1e-12), tag
    assert [s for s, _ in expected["val/loss"]] == [15, 30]


# ------------------------------------------------------------------------------ ROUGE-L and BLEU


@pytest.mark.parametrize(
    ("prediction", "reference", "score"),
    [
        # LCS "the cat on the mat": 5 of 6 tokens each way, F = 5/6.
        ("the cat was on the mat", "the cat sat on the mat", 5 / 6),
        # LCS 3: precision 3/3, recall 3/6, F = 2PR / (P + R) = 2/3.
        ("the cat sat", "the cat sat on the mat", 2 / 3),
        # Porter stemming: cats -> cat, sitting/sits -> sit; LCS 2, P = 1, R = 2/3, F = 0.8.
        ("cats sitting", "the cat sits", 0.8),
        # Case and punctuation do not count.
        ("The Cat, sat!", "the cat sat", 1.0),
        ("dogs bark", "the cat sat", 0.0),
    ],
)
def test_rouge_l_equals_the_hand_computed_lcs_f_measure(prediction, reference, score):
    need("rouge_score")
    assert rouge_l(prediction, reference) == pytest.approx(score, abs=1e-12)


def test_corpus_bleu_equals_the_hand_computed_score():
    need("sacrebleu")
    # "the cat sat on the mat" against "the cat sat on a mat": clipped n-gram matches 5/6, 3/5,
    # 2/4, 1/3; equal lengths, so no brevity penalty: BLEU = (5/6 * 3/5 * 2/4 * 1/3) ** (1/4).
    one = corpus_bleu(["the cat sat on the mat"], ["the cat sat on a mat"])
    assert one == pytest.approx(100 * (1 / 12) ** 0.25, abs=1e-9)  # 53.73
    # Add "a dog barked" / "the dog barked loudly" (matches 2/3, 1/2, 0/1, 0/0): corpus BLEU
    # sums the counts, 7/9, 4/7, 2/5, 1/3, and 9 words against 10 cost exp(1 - 10/9).
    two = corpus_bleu(["the cat sat on the mat", "a dog barked"],
                      ["the cat sat on a mat", "the dog barked loudly"])  # fmt: skip
    assert two == pytest.approx(100 * math.exp(-1 / 9) * (8 / 135) ** 0.25, abs=1e-9)  # 44.15
    assert bleu("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(100.0)


def test_sacrebleu_gives_its_documented_example():
    """sacrebleu's README example, so that a change of its defaults (tokeniser, smoothing) shows."""
    sacrebleu = need("sacrebleu")
    refs = [
        ["The dog bit the man.", "It was not unexpected.", "The man bit him first."],
        ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."],
    ]
    hyps = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
    assert round(sacrebleu.corpus_bleu(hyps, refs).score, 2) == 48.53
