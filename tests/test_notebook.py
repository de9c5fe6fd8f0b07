"""Notebook ergonomics: the streaming display helper, Markdown reprs, and assets/quickstart.ipynb."""

from __future__ import annotations

import ast
import io
import sys
import types
from pathlib import Path

import pytest
from api_support import scripted, tiny_model

from qwen2_mlx import Chat, Reply, stream_generate
from qwen2_mlx.generation.notebook import display_stream

NOTEBOOK = Path(__file__).resolve().parents[1] / "assets" / "quickstart.ipynb"


def test_display_stream_prints_outside_jupyter(mt, monkeypatch):
    model, tok = mt
    monkeypatch.setitem(sys.modules, "IPython", None)  # as if IPython were not installed
    ids = tok.encode("Hello, how are you?", add_special_tokens=False)
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    reply = display_stream(stream_generate(model, tok, "Hi", max_tokens=len(ids), sampler=scripted(ids)))
    assert isinstance(reply, Reply) and reply == "Hello, how are you?"
    assert out.getvalue() == "Hello, how are you?\n[stopped at max_tokens]\n"


class FakeJupyter:
    """Just enough of IPython for display_stream: a kernel, display handles and Markdown."""

    def __init__(self):
        self.displays, self.updates = [], []
        outer = self

        class Markdown:
            def __init__(self, data):
                self.data = data

        class Handle:
            def update(self, obj):
                outer.updates.append(obj.data)

        def display(obj, display_id=False):
            outer.displays.append(obj.data)
            return Handle()

        self.ipython = types.ModuleType("IPython")
        self.ipython.get_ipython = lambda: types.SimpleNamespace(kernel=object())
        self.display_module = types.ModuleType("IPython.display")
        self.display_module.display, self.display_module.Markdown = display, Markdown


def test_display_stream_updates_one_jupyter_display(mt, monkeypatch):
    model, tok = mt
    fake = FakeJupyter()
    monkeypatch.setitem(sys.modules, "IPython", fake.ipython)
    monkeypatch.setitem(sys.modules, "IPython.display", fake.display_module)
    ids = tok.encode("The quick brown fox", add_special_tokens=False)
    reply = display_stream(stream_generate(model, tok, "Hi", max_tokens=len(ids), sampler=scripted(ids)), interval=0.0)
    assert fake.displays == [""]  # one display, updated in place
    assert len(fake.updates) >= 3
    assert all(fake.updates[i + 1].startswith(fake.updates[i]) for i in range(len(fake.updates) - 2))
    assert fake.updates[-1] == reply._repr_markdown_() == "The quick brown fox\n\n*[stopped at max_tokens]*"


def test_interrupting_a_displayed_chat_keeps_the_partial_reply(mt):
    model, tok = mt
    chat = Chat(model, tok)
    calls = []

    def interrupt_on_third_token(tokens, logits):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return logits

    with pytest.raises(KeyboardInterrupt):
        display_stream(chat.stream("Hi", logits_processors=[interrupt_on_third_token]), file=io.StringIO())
    assert chat.last_reply.finish_reason == "cancelled"
    assert chat._cache[0].offset == len(chat._cache_tokens)
    assert chat.send("Again", max_tokens=2).finish_reason == "length"  # the chat is usable again


def run_cell(source: str, namespace: dict):
    """Run a cell like Jupyter: the value of a final expression is rendered through its reprs."""
    tree = ast.parse(source)
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    exec(compile(tree, "<cell>", "exec"), namespace)
    if last is None:
        return None
    value = eval(compile(ast.Expression(last.value), "<cell>", "eval"), namespace)
    if hasattr(value, "_repr_markdown_"):
        assert isinstance(value._repr_markdown_(), str)
    return value


def test_quickstart_notebook_runs_against_a_tiny_model(tmp_path_factory, tmp_path, monkeypatch, capsys):
    nbformat = pytest.importorskip("nbformat")
    _, _, path = tiny_model(tmp_path_factory)
    monkeypatch.setenv("QWEN2_MLX_MODEL", str(path))
    monkeypatch.setitem(sys.modules, "IPython", None)
    monkeypatch.chdir(tmp_path)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    cells = [c for c in nb.cells if c.cell_type == "code"]
    assert len(cells) >= 8
    assert any("parameters" in c.metadata.get("tags", []) for c in cells)
    namespace: dict = {}
    values = [run_cell(c.source, namespace) for c in cells]
    assert all(not c.get("outputs") for c in cells)  # the notebook is stored without outputs
    assert namespace["MODEL_PATH"] == str(path)
    # what the notebook claims holds on the tiny model too
    tok = namespace["tokenizer"]
    up_to_second = tok.apply_chat_template(namespace["chat"].messages[:4], add_generation_prompt=True, tokenize=False)
    assert namespace["second"].stats.prompt_tokens < len(tok.encode(up_to_second, add_special_tokens=False))
    assert isinstance(values[-2], int) and values[-2] < namespace["held"]  # only the question was prefilled
    assert len(namespace["batch"].texts) == 3
    assert not list(tmp_path.iterdir())  # nothing written into the folder it was started from
    work = Path(namespace["WORKDIR"])
    assert (work / "document.safetensors").exists() and (work / "quickstart-chat.json").exists()
    assert "prompt tokens:" in capsys.readouterr().out
