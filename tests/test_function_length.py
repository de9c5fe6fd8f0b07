"""No function in the package or the chat app is longer than 80 lines (ast: first to last line).

A function that long does several jobs; splitting it names them. There are no exceptions.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 80


def long_functions(root: Path = ROOT) -> dict[str, int]:
    """`path:Class.function` -> its length in lines, for every function over LIMIT lines."""
    found = {}
    for path in sorted(p for d in ("qwen2_mlx", "tui") for p in (root / d).rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        found.update(_walk(tree, path.relative_to(root).as_posix(), ""))
    return found


def _walk(node: ast.AST, where: str, prefix: str) -> dict[str, int]:
    found = {}
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            name = prefix + child.name
            length = child.end_lineno - child.lineno + 1
            if not isinstance(child, ast.ClassDef) and length > LIMIT:
                found[f"{where}:{name}"] = length
            found.update(_walk(child, where, name + "."))
        else:
            found.update(_walk(child, where, prefix))
    return found


def test_no_function_is_longer_than_80_lines():
    long = long_functions()
    assert not long, "functions over 80 lines (split them): " + ", ".join(f"{k} ({v})" for k, v in long.items())
