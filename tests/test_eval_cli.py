"""`lmforge eval`: loss/perplexity on prepared tokens, EM/F1/accuracy on Q&A, bad input."""

from __future__ import annotations

import json
import math

import pytest
from helpers import (
    checksums,
    lmforge,
    make_tiny_run,
    one_error_line,
    story_records,
    write_jsonl,
)

from lmforge.tokenizers import ByteTokenizer, load_tokenizer


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A char-prepared folder and a run whose checkpoint uses its tokenizer."""
    root = tmp_path_factory.mktemp("eval")
    text = root / "stories.txt"
    text.write_text("\n\n".join(r["story"] for r in story_records(200)), encoding="utf-8")
    folder = root / "data"
    assert (
        lmforge("prepare", text, "--out", folder, "--tokenizer", "char", "--val-fraction", "0.2")
        == 0
    )
    run = make_tiny_run(
        root / "run", tokenizer=load_tokenizer(folder), phase="sft", data_dir=str(folder)
    )
    return root, folder, run


def test_eval_on_prepared_tokens_gives_loss_and_perplexity(prepared, capsys):
    root, folder, run = prepared
    out = root / "tokens.json"
    assert lmforge("eval", run, "--data", folder, "--json", out) == 0
    result = json.loads(out.read_text())
    loss = result["metrics"]["loss"]
    assert result["kind"] == "tokens" and result["tokens"] > 0
    assert 0 < loss < 10 and math.isclose(result["metrics"]["perplexity"], math.exp(loss))
    assert "perplexity" in capsys.readouterr().out


def test_eval_on_story_qa_writes_the_metrics(prepared, capsys):
    root, _, run = prepared
    data = write_jsonl(root / "qa_val.jsonl", story_records(12, seed=5))
    out = root / "qa.json"
    assert (
        lmforge(
            "eval",
            run,
            "--data",
            f"stories-qa:{data}",
            "--limit",
            "5",
            "--json",
            out,
            "--max-new-tokens",
            "8",
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert result["examples"] == 5 and len(result["predictions"]) == 5
    assert set(result["metrics"]) == {"exact_match", "f1", "accuracy"}
    assert all(0 <= v <= 100 for v in result["metrics"].values())
    by_kind = result["per_question"]  # these test questions are not the generator's: "other"
    assert set(by_kind) <= {"what color", "other"}
    assert sum(v["examples"] for v in by_kind.values()) == 5
    from lmforge import evaluate

    right = sum(evaluate.story_accuracy(p["prediction"], p["references"][0])
                for p in result["predictions"])  # fmt: skip
    assert sum(v["accuracy"] * v["examples"] for v in by_kind.values()) == pytest.approx(
        100 * right, abs=1e-6
    )
    out = capsys.readouterr().out
    assert "exact_match" in out and "accuracy by question" in out


@pytest.mark.parametrize(
    "content, says",
    [
        ('[{"instruction": "Say hi", "output": "hi"', "not valid JSON"),
        ('[{"instruction": "Say hi", "input": ""}]', "'output'"),
        ("   \n", "empty"),
    ],
)
def test_eval_refuses_bad_qa_files(prepared, tmp_path, capsys, content, says):
    _, _, run = prepared
    bad = tmp_path / "bad.json"
    bad.write_text(content, encoding="utf-8")
    out = tmp_path / "out.json"
    before = checksums(tmp_path, run)
    assert lmforge("eval", run, "--data", f"alpaca:{bad}", "--json", out) == 2
    assert says in one_error_line(capsys.readouterr().err)
    assert not out.exists() and checksums(tmp_path, run) == before


def test_eval_refuses_a_checkpoint_with_another_tokenizer(prepared, tmp_path, capsys):
    _, folder, _ = prepared
    byte_run = make_tiny_run(tmp_path / "byte", tokenizer=ByteTokenizer())
    out = tmp_path / "out.json"
    before = checksums(folder, byte_run)
    assert lmforge("eval", byte_run, "--data", folder, "--json", out) == 2
    assert "tokenizer mismatch" in one_error_line(capsys.readouterr().err)
    assert not out.exists() and checksums(folder, byte_run) == before


def test_eval_refuses_unknown_metrics(prepared, capsys):
    _, folder, run = prepared
    assert lmforge("eval", run, "--data", folder, "--metrics", "em,meteor") == 2
    assert "meteor" in one_error_line(capsys.readouterr().err)
