"""`lmforge generate` and `lmforge chat`: streaming text, the chat template, piped chat."""

from __future__ import annotations

import io

import pytest
from helpers import lmforge, lmforge_subprocess, make_tiny_run, one_error_line

from lmforge.chat_format import Turn, render_prompt
from lmforge.generate import StreamPrinter, fit_history, prompt_budget
from lmforge.tokenizers import ByteTokenizer


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {"pre": make_tiny_run(root / "pre"), "sft": make_tiny_run(root / "sft", phase="sft")}


def test_generate_prints_a_continuation(runs, capsys):
    argv = ("generate", runs["pre"], "--prompt", "Ben had", "--max-new-tokens", "20", "--seed", "3")
    assert lmforge(*argv) == 0
    first = capsys.readouterr().out
    assert first.startswith("Ben had") and len(first.strip()) > len("Ben had")
    assert lmforge(*argv) == 0
    assert capsys.readouterr().out == first  # same seed, same text


def test_generate_several_samples_and_chat_template(runs, capsys):
    assert (
        lmforge(
            "generate",
            runs["sft"],
            "--prompt",
            "Who had the cup?",
            "--num-samples",
            "2",
            "--max-new-tokens",
            "10",
            "--seed",
            "0",
            "--temperature",
            "1.0",
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "Who had the cup?" not in out  # the template's reply, not a continuation
    assert out.count("\n\n") == 1


def test_generate_refuses_bad_settings(runs, capsys, tmp_path):
    assert lmforge("generate", runs["pre"], "--prompt", "x", "--top-p", "0") == 2
    assert "--top-p" in one_error_line(capsys.readouterr().err)
    assert lmforge("generate", tmp_path / "nothing", "--prompt", "x") == 2
    assert "no checkpoint" in one_error_line(capsys.readouterr().err)


def test_chat_answers_each_piped_line(runs):
    result = lmforge_subprocess(
        "chat",
        runs["sft"],
        "--seed",
        "0",
        "--max-new-tokens",
        "12",
        input="hello\nwhat?\n/exit\nnever read\n",
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 2, result.stdout  # one answer line per question


def test_chat_reset_and_end_of_input(runs):
    result = lmforge_subprocess(
        "chat",
        runs["sft"],
        "--seed",
        "0",
        "--max-new-tokens",
        "5",
        input="hello\n/reset\n\nagain\n",
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 2, result.stdout


def test_stream_printer_holds_back_half_characters():
    out = io.StringIO()
    printer = StreamPrinter(ByteTokenizer(), out)
    for byte in "hé!".encode():
        printer(0, byte)
    assert printer.finish() == "hé!" and out.getvalue() == "hé!"
    assert "\ufffd" not in out.getvalue()


def test_chat_history_drops_the_oldest_turns():
    tok = ByteTokenizer()
    history = [Turn("user", "a" * 40), Turn("assistant", "b" * 40), Turn("user", "last?")]
    kept, ids = fit_history(history, tok, budget=30)
    assert kept == [Turn("user", "last?")]
    assert ids == render_prompt(kept, tok)
    kept, ids = fit_history([Turn("user", "q" * 100)], tok, budget=30)
    assert len(ids) == 30  # one long question: its end is kept


def test_chat_keeps_the_story_with_the_default_max_new_tokens():
    """A 256-token model asked about a 200-character story, with --max-new-tokens 200 (the
    default): the prompt keeps the whole story, not the last 56 tokens of it."""
    tok = ByteTokenizer()
    story = "One windy day, Ben lost his red candle. " * 5  # 200 characters
    budget = prompt_budget(256, 200)
    kept, ids = fit_history([Turn("user", story + "\nWho lost the candle?")], tok, budget)
    assert ids == render_prompt(kept, tok)  # nothing cut
    assert budget == 224 and prompt_budget(256, 10) == 246 and prompt_budget(2048, 200) == 1848
