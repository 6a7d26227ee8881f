"""The command surface: every subcommand and option is documented, usage errors are one line."""

import argparse
import subprocess
import sys

import pytest

from lmforge.cli import build_parser, main
from lmforge.commands import COMMANDS

SPEC_COMMANDS = {
    "prepare",
    "train",
    "sft",
    "generate",
    "chat",
    "eval",
    "report",
    "compare",
    "export",
    "model-info",
    "env",
}


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_spec_command_exists():
    assert SPEC_COMMANDS <= set(COMMANDS)


@pytest.mark.parametrize("name", sorted(SPEC_COMMANDS))
def test_every_option_has_help(name):
    sub = subparsers(build_parser(name))[name]
    for action in sub._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and action.help.strip(), f"lmforge {name} {action.dest} has no help"


@pytest.mark.parametrize(
    "args",
    [
        ["bogus-command"],
        ["prepare", "--no-such-flag", "x"],
        ["model-info"],
        ["model-info", "no-such-preset"],
    ],
)
def test_usage_errors_are_one_line_exit_2(args, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lmforge: error:")


def test_model_info_prints_exact_counts():
    out = subprocess.run(
        [sys.executable, "-m", "lmforge", "model-info", "gpt2-124m"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "parameters: 124,439,808 (with padded vocab: 124,475,904)" in out
    assert "FLOPs per token" in out and "chunked loss" in out


def test_python_dash_m_and_help():
    result = subprocess.run(
        [sys.executable, "-m", "lmforge", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0
    for name in SPEC_COMMANDS:
        assert name in result.stdout


def test_every_command_and_option_is_documented_in_the_readme():
    """The README's command reference is the parser's: a new command or option fails this test
    until `make docs` writes it into the README (and its help text says what it does)."""
    import re
    from pathlib import Path

    from lmforge.commands import reference_markdown

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    found = re.search(
        r"<!-- cli-reference:start -->\n(.*?)<!-- cli-reference:end -->", readme, re.S
    )
    assert found, "README.md has no command reference (<!-- cli-reference:start --> ... end)"
    assert found.group(1) == reference_markdown(), "README's command reference is stale: make docs"
