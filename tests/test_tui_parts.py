"""Unit tests of the chat app's parts that need no screen: store, export names, slash commands,
CJK line breaking, the generation thread and the command line."""

from __future__ import annotations

import asyncio
import inspect
import io
import json
import sqlite3
import threading

import pytest

from tui import cjk_wrap, commands, slash
from tui.__main__ import main, run_once
from tui.engine import Engine, Failed, Finished, Loaded, Loading, Token
from tui.export import export_chat, slugify
from tui.fake import FakeBackend
from tui.store import Store


def test_store_is_wal_and_keeps_a_message_tree(tmp_path):
    store = Store(tmp_path / "c.sqlite3")
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    chat = store.new_chat("t", system="sys", settings={"temperature": 0.5})
    u = store.add_message(chat.id, None, "user", "q")
    a1 = store.add_message(chat.id, u.id, "assistant", "a1")
    store.add_message(chat.id, u.id, "assistant", "a2")
    assert [m.content for m in store.path(chat.id)] == ["q", "a2"]
    assert [m.content for m in store.siblings(a1)] == ["a1", "a2"]
    store.update_chat(chat.id, leaf_id=store.deepest(a1).id)
    assert [m.content for m in store.path(chat.id)] == ["q", "a1"]
    # another connection (another process) sees every write at once
    other = sqlite3.connect(tmp_path / "c.sqlite3")
    assert other.execute("SELECT count(*) FROM messages").fetchone()[0] == 3
    assert json.loads(other.execute("SELECT settings FROM chats").fetchone()[0]) == {"temperature": 0.5}
    store.delete_chat(chat.id)
    assert other.execute("SELECT count(*) FROM messages").fetchone()[0] == 0
    with pytest.raises(ValueError):
        store.update_chat(chat.id, bogus=1)


def test_store_history_skips_repeats_and_blank(tmp_path):
    store = Store(tmp_path / "c.sqlite3")
    for t in ["a", "a", "  ", "b", "a"]:
        store.add_history(t)
    assert store.history() == ["a", "b", "a"]


@pytest.mark.parametrize(
    "title,stem",
    [
        ("量子计算入门", "量子计算入门"),
        ("Привет, мир!", "Привет-мир"),
        ("日本語のテスト: a/b\\c", "日本語のテスト-a-b-c"),
        ("café  ☕ ", "café"),
        ("///", "chat"),
        ("../../etc/passwd", "etc-passwd"),
    ],
)
def test_slugify_keeps_every_script(title, stem):
    assert slugify(title) == stem


def test_slugify_limits_bytes():
    name = slugify("汉" * 200)
    assert len(name.encode()) <= 120 and set(name) == {"汉"}


def test_export_never_overwrites(tmp_path):
    msgs = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]
    p1 = export_chat("问候", "be kind", msgs, "md", directory=tmp_path)
    p2 = export_chat("问候", "be kind", msgs, "md", directory=tmp_path)
    p3 = export_chat("问候", "be kind", msgs, "jsonl", directory=tmp_path)
    assert (p1.name, p2.name, p3.name) == ("问候.md", "问候-2.md", "问候.jsonl")
    assert [json.loads(x)["role"] for x in p3.read_text(encoding="utf-8").splitlines()] == [
        "system",
        "user",
        "assistant",
    ]
    with pytest.raises(ValueError):
        export_chat("x", None, msgs, "pdf", directory=tmp_path)


@pytest.mark.parametrize(
    "text,key,value",
    [
        ("/set temp 0.7", "temperature", 0.7),
        ("/set top_p 0.9", "top_p", 0.9),
        ("/set top_k 40", "top_k", 40),
        ("/set rep 1.1", "repetition_penalty", 1.1),
        ("/max 256", "max_tokens", 256),
        ("/max none", "max_tokens", None),
        ("/set seed 42", "seed", 42),
        ("/set context drop_oldest", "context_policy", "drop_oldest"),
    ],
)
def test_set_commands(text, key, value):
    cmd = commands.parse(text)
    assert (cmd.name, cmd.key, cmd.value) == ("set", key, value)


@pytest.mark.parametrize(
    "text,error",
    [
        ("/set temp hot", "temp needs a number"),
        ("/set top_p 2", "between"),
        ("/set", "usage"),
        ("/set color red", "unknown setting"),
        ("/max", "usage"),
        ("/set context forget", "context must be"),
        ("/rename", "usage"),
    ],
)
def test_bad_commands_say_why(text, error):
    with pytest.raises(commands.CommandError, match=error):
        commands.parse(text)


def test_every_command_in_the_table_has_help_text_and_a_handler():
    assert len(slash.COMMANDS) >= 14
    for name, entry in slash.COMMANDS.items():
        assert entry.usage.split()[0] == f"/{name}" and entry.help.strip(), name
        assert inspect.iscoroutinefunction(entry.handler), name
        assert slash.find(name) is entry
    assert slash.find("exit") is slash.COMMANDS["quit"]


def test_help_lists_the_table():
    from tui.screens.dialogs import help_markdown

    page = help_markdown("keymap.json", [], slash.help_rows())
    section = page.split("# Slash commands")[1].split("# Changing keys")[0]
    rows = [line for line in section.splitlines() if line.startswith("| `/")]
    esc = lambda text: text.replace("|", "\\|")  # noqa: E731  (a bare | would split the cell: issue 26)
    assert rows == [f"| `{esc(e.usage)}` | {esc(e.help)} |" for e in slash.COMMANDS.values()]


@pytest.mark.parametrize("text", ["/frobnicate", "/Frobnicate now", "/"])
def test_unknown_command_error_is_unchanged(text):
    cmd = commands.parse(text)
    with pytest.raises(commands.CommandError) as e:
        slash.find(cmd.name)
    name = text[1:].split(" ")[0].lower()
    assert str(e.value) == f"unknown command /{name}: type /help for the list (start with // to send a '/')"


def test_set_and_max_run_the_handler_that_stores_the_setting():
    class Chat:  # the part of ChatScreen the handler uses
        def __init__(self):
            self.settings, self.notes, self.saved = {}, [], 0

        def save_chat_settings(self):
            self.saved += 1

        def notify(self, text, **kw):
            self.notes.append(text)

        def local_only(self, key):  # a model in the process: every setting acts
            return None

    chat = Chat()
    for text in ("/max 64", "/set temp 0.2"):
        cmd = commands.parse(text)
        asyncio.run(slash.find(cmd.name).handler(chat, cmd))
    assert chat.settings == {"max_tokens": 64, "temperature": 0.2} and chat.saved == 2
    assert chat.notes == ["max_tokens = 64", "temperature = 0.2"]


def test_plain_text_and_escaped_slash_are_messages():
    assert commands.parse("hello /set") is None
    assert commands.parse("//path") is None and commands.unescape("//path") == "/path"
    assert commands.parse("/export jsonl out.jsonl").value == "jsonl"
    assert commands.parse("/export jsonl out.jsonl").arg == "out.jsonl"
    assert commands.parse("/system 你是一个助手").arg == "你是一个助手"


def test_cjk_wrap_breaks_between_characters_but_not_before_closing_punctuation():
    from rich._wrap import divide_line

    assert cjk_wrap.install()
    text = "Python 是一种编程语言，它很简单。"
    lines = []
    start = 0
    for end in divide_line(text, 12) + [len(text)]:
        lines.append(text[start:end])
        start = end
    assert lines[0].startswith("Python 是")  # the Chinese starts on the first line
    assert not any(line[:1] in "，。" for line in lines[1:])
    assert "".join(lines) == text
    offsets = [s for s, _, _ in cjk_wrap.chunks("a b中文")]
    assert offsets == [0, 2, 3, 4]


def _events(backend, history=None, cancel_after=None):
    got = []
    done = threading.Event()

    def post(ev):
        got.append(ev)
        if isinstance(ev, (Finished, Failed)):
            done.set()
        if cancel_after is not None and isinstance(ev, Token) and len(got) >= cancel_after:
            engine.cancel()

    engine = Engine(backend, post)
    engine.start()
    job = engine.submit(history or [{"role": "user", "content": "hi"}], None, {"max_tokens": 100})
    assert done.wait(10)
    engine.shutdown()
    return job, got


def test_engine_streams_loads_first_and_finishes():
    job, got = _events(FakeBackend(["one two three"]))
    assert isinstance(got[0], Loading) and any(isinstance(e, Loaded) for e in got)
    assert "".join(e.text for e in got if isinstance(e, Token)) == "one two three"
    assert isinstance(got[-1], Finished) and got[-1].reason == "stop" and got[-1].text == "one two three"
    assert got[-1].job == job.id


def test_engine_cancel_stops_at_once():
    job, got = _events(FakeBackend([" ".join(["w"] * 500)], delay=0.01), cancel_after=4)
    fin = got[-1]
    assert isinstance(fin, Finished) and fin.reason == "cancelled"
    assert fin.text.count("w") < 20


def test_engine_reports_errors_without_dying():
    _, got = _events(FakeBackend(), [{"role": "user", "content": "FAIL"}])
    assert isinstance(got[-1], Failed) and "scripted" in got[-1].error


def test_run_once_prints_the_reply_and_notes_a_cut():
    out, err = io.StringIO(), io.StringIO()
    assert run_once(FakeBackend(["你好，世界 and more words"]), "hi", None, {"max_tokens": 2}, out, err) == 0
    assert out.getvalue() == "你好\n" and "--max-tokens" in err.getvalue()
    out, err = io.StringIO(), io.StringIO()
    assert run_once(FakeBackend(load_error="bad weights"), "hi", None, {}, out, err) == 2
    assert "python convert.py" in err.getvalue() and out.getvalue() == ""


def test_cli_missing_model_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert main(["--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "python convert.py" in err and "Traceback" not in err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    assert main(["--model", str(broken), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and "Traceback" not in err


def test_cli_empty_prompt_is_refused(capsys):
    assert main(["--prompt", "   "]) == 2
    assert "empty" in capsys.readouterr().err


def test_fake_backend_timing_is_fixed():
    # snapshot tests rely on the stats not depending on the clock
    b = FakeBackend(["a b"])
    rs = list(b.generate([{"role": "user", "content": "x"}], None, {}, threading.Event()))
    assert {(r.prompt_tps, r.generation_tps, r.peak_memory, r.time_to_first_token) for r in rs} == {
        (120.0, 30.0, 0.5, 0.25)
    }


def test_piped_stdin_joins_the_prompt(monkeypatch, capsys):
    import tui.__main__ as cli

    seen = {}

    def fake_run_once(backend, text, system, settings, *a, **k):
        seen["text"] = text
        return 0

    monkeypatch.setattr(cli, "read_piped_stdin", lambda: "diff --git a/x b/x\n+新しい行\n")
    monkeypatch.setattr(cli, "check_model", lambda path: None)
    monkeypatch.setattr(cli, "run_once", fake_run_once)
    assert cli.main(["--prompt", "Review this diff"]) == 0
    assert seen["text"] == "Review this diff\n\ndiff --git a/x b/x\n+新しい行\n"
    assert cli.main([]) == 0 and seen["text"].startswith("diff --git")
    monkeypatch.setattr(cli, "read_piped_stdin", lambda: "  \n")
    assert cli.main([]) == 2 and "empty" in capsys.readouterr().err


def test_engine_reports_prompt_reading_progress():
    from tui.engine import Prefill

    _, got = _events(FakeBackend(["ok"]), [{"role": "user", "content": "x " * 40}])
    steps = [(e.done, e.total) for e in got if isinstance(e, Prefill)]
    assert steps and steps[-1][0] == steps[-1][1] > 0


def test_fake_and_model_backends_implement_the_backend_interface(tmp_path):
    from tui.backend import Backend, ModelBackend

    members = set(Backend.__annotations__) | {"load", "generate", "count_tokens"}
    for backend in (FakeBackend(), ModelBackend(tmp_path / "some-model")):
        missing = {m for m in members if not hasattr(backend, m)}
        assert not missing, (type(backend).__name__, missing)
    assert {"context_used", "last_reply", "prefill_progress"} <= members


def test_model_label(tmp_path, monkeypatch):
    from tui.backend import model_label

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert model_label(tmp_path / "qwen2-mlx" / "models" / "default") == "default model"
    assert model_label(tmp_path / "Qwen2-7B-4bit") == "Qwen2-7B-4bit"
