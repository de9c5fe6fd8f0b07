"""The package's architecture, read from its imports (ast): layers import downwards only, no cycles.

Layers, lowest first (docs/architecture.md):
  models      the modules, their config, RoPE/YaRN, DCA, KV cache and sharding (MLX and mlx-lm only)
  loading     reading folders and checkpoints, the tokenizer, where files live
  generation  sampling and stopping, prompt caches, batches, chat sessions, notebook display
  arguments   the command-line switches the tools share (long context, KV cache)
  tools       convert, eval, bench, distributed, serve: programs built on the layers below
  tui         the chat app, on top of everything; nothing in qwen2_mlx imports it
`qwen2_mlx/__init__.py` (the lazy public names) and `runtime/` (the OpenBLAS re-run, optional packages:
standard library only) sit beside them.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"models": 0, "loading": 1, "generation": 2, "arguments": 3, "tools": 4, "tui": 5}
TOOLS = ("convert", "eval", "bench", "distributed", "serve")


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "tui":
        return "tui"
    if parts[0] != "qwen2_mlx" or len(parts) == 1:
        return None  # outside the project, or the package's lazy facade
    if parts[1] in TOOLS:
        return "tools"
    if parts[1] == "runtime":
        return "base"
    return parts[1] if parts[1] in LAYERS else "unknown"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path, typing_too: bool = False) -> set[str]:
    """Every project module this file imports, at any depth (functions too), relative ones resolved.

    `typing_too`: also the imports under `if TYPE_CHECKING:` (they never run, but a circle through
    them is still two modules that each need the other to be read)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {
        id(n)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and _is_type_checking(block.test)
        for stmt in block.body
        for n in ast.walk(stmt)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only and not typing_too:
            continue  # `if TYPE_CHECKING:` imports never run
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from pkg import sub` imports the submodule when there is one
            for a in node.names:
                sub = f"{mod}.{a.name}"
                found.add(sub if _exists(sub) else mod)
    return {m for m in found if m.split(".")[0] in ("qwen2_mlx", "tui")}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _exists(module: str) -> bool:
    base = ROOT.joinpath(*module.split("."))
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def all_modules(typing_too: bool = False) -> dict[str, set[str]]:
    files = [p for d in ("qwen2_mlx", "tui") for p in (ROOT / d).rglob("*.py")]
    return {module_name(p): project_imports(p, typing_too) for p in files}


GRAPH = all_modules()
FULL_GRAPH = all_modules(typing_too=True)  # `if TYPE_CHECKING:` imports included


def test_every_module_has_a_declared_layer():
    unknown = sorted(m for m in GRAPH if layer_of(m) == "unknown")
    assert not unknown, f"modules outside the declared layers: {unknown} (add them to LAYERS or TOOLS)"


def test_imports_flow_downwards_only():
    wrong = []
    for mod, imports in GRAPH.items():
        here = layer_of(mod)
        for imp in imports:
            there = layer_of(imp)
            if imp == "qwen2_mlx" and here not in ("tools", "tui", None):
                wrong.append(f"{mod} imports the public facade `qwen2_mlx` (import the defining module)")
            elif here == "base" and there not in (None, "base"):
                wrong.append(f"{mod} (standard library only) imports {imp}")
            elif there in LAYERS and here in LAYERS and LAYERS[there] > LAYERS[here]:
                wrong.append(f"{mod} ({here}) imports {imp} ({there})")
    assert not wrong, "\n".join(wrong)


def test_model_code_imports_only_model_code():
    outside = sorted(
        f"{m} -> {i}"
        for m, imps in GRAPH.items()
        if layer_of(m) == "models"
        for i in imps
        if layer_of(i) not in ("models", "base")
    )
    assert not outside, outside


def test_no_import_cycles():
    """No circle anywhere, `if TYPE_CHECKING:` imports included (issue 20 removed the last one,
    `tui/screens/chat.py` <-> `tui/slash.py`: slash commands see the screen through `slash.ChatActions`)."""
    graph = FULL_GRAPH
    seen, stack, cycles = set(), [], []

    def visit(m):
        if m in stack:
            cycles.append(stack[stack.index(m) :] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if n in graph and n != m and not m.startswith(n + "."):  # a package's own __init__ is no cycle
                visit(n)
        stack.pop()

    for m in sorted(graph):
        visit(m)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_checker_finds_a_planted_upward_import_and_cycle(tmp_path, monkeypatch):
    """The rules above fail on the knots the layout removed (the model importing a command line)."""
    graph = {
        "qwen2_mlx.models.model": {"qwen2_mlx.distributed"},
        "qwen2_mlx.distributed": {"qwen2_mlx.generation.chat"},
        "qwen2_mlx.generation.chat": {"qwen2_mlx.models.model"},
    }
    monkeypatch.setattr(sys.modules[__name__], "GRAPH", graph)
    monkeypatch.setattr(sys.modules[__name__], "FULL_GRAPH", graph)
    with pytest.raises(AssertionError, match="qwen2_mlx.models.model -> qwen2_mlx.distributed"):
        test_model_code_imports_only_model_code()
    with pytest.raises(AssertionError, match="imports qwen2_mlx.distributed"):
        test_imports_flow_downwards_only()
    with pytest.raises(AssertionError, match="->"):
        test_no_import_cycles()


def test_the_cycle_check_sees_type_checking_imports(tmp_path, monkeypatch):
    """A circle closed only by an `if TYPE_CHECKING:` import is found (the one slash.py had)."""
    pkg = tmp_path / "tui"
    pkg.mkdir()
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert project_imports(pkg / "b.py") == set()
    graph = {"tui.a": project_imports(pkg / "a.py", True), "tui.b": project_imports(pkg / "b.py", True)}
    assert graph == {"tui.a": {"tui.b"}, "tui.b": {"tui.a"}}
    monkeypatch.setattr(sys.modules[__name__], "FULL_GRAPH", graph)
    with pytest.raises(AssertionError, match="tui.a -> tui.b -> tui.a"):
        test_no_import_cycles()


def _imports_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys; print(' '.join(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "QWEN2_MLX_NO_OPENBLAS": "1", "HOME": str(ROOT)},
    )
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


def test_importing_the_model_loads_no_generation_chat_or_command_line():
    loaded = _imports_after("import qwen2_mlx.models.model")
    assert "mlx.core" in loaded
    assert not {
        m
        for m in loaded
        if m.startswith(
            ("qwen2_mlx.generation", "qwen2_mlx.loading", "qwen2_mlx.arguments", "qwen2_mlx.distributed", "tui")
        )
    }


def test_public_names_load_lazily():
    assert "mlx.core" not in _imports_after("import qwen2_mlx; assert 'load' in dir(qwen2_mlx)")
    loaded = _imports_after("from qwen2_mlx import Chat, load, ModelArgs")
    assert {"mlx.core", "qwen2_mlx.generation.chat", "qwen2_mlx.loading.loader"} <= loaded


ENTRY_POINTS = [
    "tui.__main__",
    "qwen2_mlx.convert.cli",
    "qwen2_mlx.eval.__main__",
    "qwen2_mlx.bench.compare",
    "qwen2_mlx.bench.long",
    "qwen2_mlx.bench.batch",
    "qwen2_mlx.bench.reopen",
    "qwen2_mlx.distributed",
    "qwen2_mlx.serve.cli",
    "qwen2_mlx.bench.serve",
]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("argv", [["--help"], ["--no-such-option"]])
def test_help_and_argument_errors_answer_without_importing_mlx(entry, argv):
    code = (
        f"from {entry} import main\ntry:\n    main({argv!r})\nexcept SystemExit as e:\n"
        f"    assert e.code == (0 if {argv!r} == ['--help'] else 2), e.code\n"
        f"else:\n    raise AssertionError('main returned')"
    )
    assert "mlx.core" not in _imports_after(code)
