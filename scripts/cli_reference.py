"""Rewrite README.md's command reference from the parser (`make docs`); tests/test_cli.py fails
while the README and the parser disagree."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from lmforge.commands import reference_markdown

START, END = "<!-- cli-reference:start -->", "<!-- cli-reference:end -->"


def main() -> int:
    readme = Path(__file__).resolve().parents[1] / "README.md"
    text = readme.read_text(encoding="utf-8")
    block = f"{START}\n{reference_markdown()}{END}"
    if START not in text:
        print(f"{readme} has no {START} marker", file=sys.stderr)
        return 2
    new = re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    readme.write_text(new, encoding="utf-8")
    print(f"updated the command reference in {readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
