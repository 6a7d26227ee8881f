"""The package's shape, checked: no import cycles, argparse only in `commands/`, and inference,
export and evaluation load without the trainer (a checkpoint is read without importing the loop).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "lmforge"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _top_level_imports(name: str, path: Path, known: set[str]) -> set[str]:
    """lmforge modules imported when `name` is imported: statements at module level (and in
    module-level `if`/`try` blocks), not those inside functions, which run only when called."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If | ast.Try):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue  # never runs
            stack.extend(node.body + node.orelse)
            if isinstance(node, ast.Try):
                stack.extend(node.finalbody + [s for h in node.handlers for s in h.body])
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            # `import a.b.c` runs a, a.b and a.b.c
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                candidate = ".".join(parts[:i])
                if candidate in known and candidate != name:
                    found.add(candidate)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), as sorted lists."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def _package_parents(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def test_no_import_cycles_between_lmforge_modules():
    modules = _modules()
    known = set(modules)
    # A package's __init__ runs before its submodules, so "a.b imports a" is not a cycle edge.
    graph = {
        name: _top_level_imports(name, path, known) - _package_parents(name)
        for name, path in modules.items()
    }
    assert len(graph) > 40  # the walk found the package
    assert any(graph.values())  # and its imports
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_only_the_commands_build_argument_parsers():
    builders = sorted(
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if "ArgumentParser(" in path.read_text(encoding="utf-8")
        or "add_argument(" in path.read_text(encoding="utf-8")
    )
    assert builders and all(b.startswith("commands/") for b in builders), builders


def test_generate_export_and_eval_run_without_the_trainer(pretrained, stories, tmp_path):
    """`lmforge generate`, `export` and `eval` on a real run, in one process: none of them
    imports the training loop, the pipeline or the optimizers."""
    code = (
        "import sys\n"
        "from lmforge.cli import main\n"
        f"assert main(['generate', {str(pretrained)!r}, '--prompt', 'One', "
        "'--max-new-tokens', '2']) == 0\n"
        f"assert main(['export', {str(pretrained)!r}, '--format', 'hf', '--out', "
        f"{str(tmp_path / 'hf')!r}]) == 0\n"
        f"assert main(['eval', {str(pretrained)!r}, '--data', {str(stories)!r}]) == 0\n"
        "heavy = sorted(m for m in sys.modules if m in ('lmforge.train.trainer', "
        "'lmforge.train.pipeline', 'lmforge.train.pretrain', 'lmforge.train.sft', "
        "'lmforge.train.optim'))\n"
        "print('heavy:', ','.join(heavy))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "heavy:"
