"""Attachments in the chat app (scripted backend): /file and --file, the preview before sending, the
long-paste chip, the message stored with its files (a reopened chat, /export), the old-database
migration, and the reading progress in the status bar."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from textual import events
from tui_helpers import make_app, ready, send, wait_until

from qwen2_mlx.generation.attachments import read_attachment, render_message
from qwen2_mlx.generation.reading_time import ReadingSpeed
from tui.app import ChatApp
from tui.fake import FakeBackend
from tui.store import SCHEMA_VERSION, Store

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("data_home")]  # conftest.py
MODELS = Path(__file__).resolve().parents[1] / "qwen2_mlx" / "models"


def bar_text(app) -> str:
    return str(app.chat.query_one("#attachments").render())


def notes(app) -> list[str]:
    return [n.message for n in app._notifications]


async def test_file_shows_what_will_be_read_then_sends_it_through_the_template(tmp_path):
    app = make_app(tmp_path, replies=["It is the model code."], context_limit=200_000)
    async with app.run_test(size=(120, 30)) as pilot:
        await ready(pilot)
        await send(pilot, f"/file {MODELS}")
        att = read_attachment(MODELS)
        await wait_until(pilot, lambda: "tokens/s" in bar_text(app))
        shown = bar_text(app)
        tokens = app.backend.count_tokens([{"role": "user", "content": render_message([att], "")}], None)
        assert f"📎 models/ · {len(att.files)} files" in shown
        assert f"{len(att.files)} files · {tokens:,} tokens · {tokens / 200_000:.0%} of the context" in shown
        assert "to read at 500 tokens/s (a short calibration)" in shown  # the fake backend's measured rate
        await send(pilot, "What is in this folder?")
        sent = app.backend.calls[-1]["history"][-1]["content"]
        assert sent == render_message([att], "What is in this folder?")
        assert "File: models/attention.py\n```python\n" in sent
        user_view = app.transcript.views[0]
        assert user_view.content.startswith("`📎 models/") and "def " not in user_view.content  # a chip, not the code
        assert not app.chat.pending and not app.chat.query_one("#attachments").display
        chat_id = app.chat.chat_id
        await send(pilot, f"/export md {tmp_path / 'out.md'}")
        assert "File: models/dca.py" in (tmp_path / "out.md").read_text()

    reopened = ChatApp(FakeBackend(["Again."]), Store(tmp_path / "chats.sqlite3"), chat_id=chat_id, animate=False)
    async with reopened.run_test(size=(120, 30)) as pilot:
        await ready(pilot)
        assert reopened.transcript.views[0].content.startswith("`📎 models/")
        await send(pilot, "And the attention?")
        first = reopened.backend.calls[-1]["history"][0]["content"]
        assert first == sent  # the model reads what it read the first time


async def test_a_long_paste_becomes_a_chip_and_bad_paths_say_why(tmp_path):
    app = make_app(tmp_path, replies=["ok"])
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        pasted = "\n".join(f"log line {i}" for i in range(300))
        app.prompt.focus()
        app.post_message(events.Paste(pasted))
        await wait_until(pilot, lambda: bool(app.chat.pending))
        assert app.prompt.text == "" and "📎 pasted text (300 lines)" in bar_text(app)
        app.post_message(events.Paste("short paste"))
        await wait_until(pilot, lambda: app.prompt.text == "short paste")
        await send(pilot, f"/file {tmp_path / 'nowhere.txt'}")
        await wait_until(pilot, lambda: any("nowhere.txt: no such file or folder" in n for n in notes(app)))
        assert len(app.chat.pending) == 1
        await send(pilot, "/file clear")
        assert not app.chat.pending and not app.chat.query_one("#attachments").display


async def test_an_edit_keeps_the_message_files(tmp_path):
    (tmp_path / "notes.txt").write_text("The passkey is 4711.\n")
    app = make_app(tmp_path, replies=["first", "second"])
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        await send(pilot, f"/file {tmp_path / 'notes.txt'}")
        await send(pilot, "What is the passkey?")
        app.transcript.views[0].focus()
        await pilot.press("e")
        await send(pilot, "Say the passkey twice.")
        content = app.backend.calls[-1]["history"][-1]["content"]
        assert content.startswith("File: notes.txt\n") and content.endswith("Say the passkey twice.")


async def test_cli_file_attaches_to_the_first_message(tmp_path, capsys):
    import tui.__main__ as cli

    assert cli.main(["--file", str(tmp_path / "missing.md"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "--file" in err and "missing.md: no such file or folder" in err and "Traceback" not in err
    (tmp_path / "a.md").write_text("# A\n")
    seen = {}

    def fake_run_once(backend, text, *a, **k):
        seen["text"] = text
        return 0

    with pytest.MonkeyPatch.context() as mp:  # one reply on stdout: the files go before the prompt
        mp.setattr(cli, "check_model", lambda path: None)
        mp.setattr(cli, "read_piped_stdin", lambda: None)
        mp.setattr(cli, "run_once", fake_run_once)
        assert cli.main(["-f", str(tmp_path / "a.md"), "--prompt", "Summarize."]) == 0
    assert seen["text"] == "File: a.md\n```markdown\n# A\n```\n\nSummarize."
    app = ChatApp(FakeBackend(["ok"]), Store(tmp_path / "c.sqlite3"), attachments=[read_attachment(tmp_path / "a.md")])
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        await wait_until(pilot, lambda: "tokens/s" in bar_text(app))
        await send(pilot, "Summarize.")
        assert app.backend.calls[-1]["history"][-1]["content"] == "File: a.md\n```markdown\n# A\n```\n\nSummarize."


def test_an_old_database_gains_the_attachments_table_and_keeps_its_chats(tmp_path):
    old = tmp_path / "old.sqlite3"
    db = sqlite3.connect(old)
    db.executescript(
        """
        CREATE TABLE chats (id INTEGER PRIMARY KEY, title TEXT NOT NULL DEFAULT '', system TEXT,
            settings TEXT NOT NULL DEFAULT '{}', model TEXT NOT NULL DEFAULT '', leaf_id INTEGER,
            created REAL NOT NULL, updated REAL NOT NULL);
        CREATE TABLE messages (id INTEGER PRIMARY KEY, chat_id INTEGER NOT NULL REFERENCES chats(id) ON DELETE CASCADE,
            parent_id INTEGER REFERENCES messages(id) ON DELETE CASCADE, role TEXT NOT NULL, content TEXT NOT NULL,
            status TEXT NOT NULL DEFAULT 'done', stats TEXT NOT NULL DEFAULT '{}', created REAL NOT NULL);
        CREATE TABLE history (id INTEGER PRIMARY KEY, text TEXT NOT NULL, created REAL NOT NULL);
        INSERT INTO chats VALUES (1, 'old chat', NULL, '{}', 'm', 2, 0, 0);
        INSERT INTO messages VALUES (1, 1, NULL, 'user', 'hello', 'done', '{}', 0);
        INSERT INTO messages VALUES (2, 1, 1, 'assistant', 'hi', 'done', '{}', 0);
        """
    )
    db.commit()
    db.close()
    store = Store(old)
    assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert [m.as_dict() for m in store.path(1)] == [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi"},
    ]
    (tmp_path / "n.txt").write_text("note\n")
    m = store.add_message(1, 2, "user", "and this?", attachments=[read_attachment(tmp_path / "n.txt")])
    store.db.execute("INSERT INTO attachments(message_id, position, data) VALUES (?, 1, '{broken')", (m.id,))
    assert store.message(m.id).as_dict()["content"] == "File: n.txt\n```\nnote\n```\n\nand this?"  # damaged row skipped
    store.delete_chat(1)
    assert store.db.execute("SELECT count(*) FROM attachments").fetchone()[0] == 0


@pytest.mark.parametrize(
    "measured, left",
    [
        (None, "12s"),  # not measured: the flat rate of the part read, 500 tokens/s
        # 1 ms a token plus 0.1 us a key: the first 2,000 tokens were predicted at 2.2 s and took 4 s,
        # so the rest (6 s + 3 s of attention predicted) will take 9 x 4 / 2.2 = 16 s, not a flat 12 s.
        (ReadingSpeed(1e-3, 1e-7), "16s"),
    ],
)
async def test_a_long_read_shows_its_rate_and_time_left(tmp_path, measured, left):
    from tui.engine import Prefill

    app = make_app(tmp_path, replies=["ok"])
    async with app.run_test(size=(140, 30)) as pilot:
        await ready(pilot)
        chat = app.chat
        chat.job = app.engine.submit([{"role": "user", "content": "x"}], None, {})  # a job to report on
        app.engine.cancel(chat.job)
        chat._reading, chat.prefill_rate = None, measured
        clock = iter([100.0, 104.0])
        import tui.screens.chat as screen

        real = screen.time.monotonic
        screen.time.monotonic = lambda: next(clock)
        try:
            chat.show_reading(Prefill(chat.job.id, 0, 8000))
            chat.show_reading(Prefill(chat.job.id, 2000, 8000))
        finally:
            screen.time.monotonic = real
        state = app.status.state
        assert f"2,000/8,000 tokens · 500 t/s · {left} left" in state and "Esc stops" in state
        learned = chat.prefill_rate  # what this read took becomes the next estimate's speed
        assert learned.source == "measured on the last read of 2,000 tokens"
        assert learned.seconds(0, 2000) == pytest.approx(4.0)
