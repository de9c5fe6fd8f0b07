"""Reading that is never lost (a tiny real model): a long read is checkpointed to the chat's cache
file as it goes, and after a stop (Esc), a quit or a crash (`kill -9` of a real process) the next
read reads only what the checkpoint lacks, with the same answer as an uninterrupted read."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from api_support import tiny_model
from tui_helpers import send, wait_until

from qwen2_mlx.generation.attachments import read_attachment, render_message
from qwen2_mlx.generation.cache_store import CacheStore
from tui.app import ChatApp
from tui.backend import DEFAULT_SETTINGS, ModelBackend
from tui.store import Store

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("data_home")]  # conftest.py
GREEDY = {"max_tokens": 6, "temperature": 0.0}
STEP, EVERY = 128, 256  # prefill step and checkpoint interval (tokens), small for a tiny model
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return tiny_model(tmp_path_factory)[2]


@pytest.fixture
def doc(tmp_path):
    path = tmp_path / "report.txt"
    path.write_text("".join(f"Section {i}: the river meets the sea near town {i * 7 % 13}.\n" for i in range(90)))
    return path


class Interrupting(ModelBackend):
    """A ModelBackend that, once `at` of the prompt is read, does `then(cancel)` (stands in for Esc or a quit)."""

    def __init__(self, path, at: float = 0.0, then=None):
        super().__init__(path, dtype="float32", prefill_step_size=STEP, checkpoint_tokens=EVERY)
        self.at, self.then, self.fired = at, then, False

    def generate(self, history, system, settings, cancel):
        report = self.prefill_progress

        def progress(done, total):
            if report is not None:
                report(done, total)
            if self.then is not None and not self.fired and done >= self.at * total:
                self.fired = True
                self.then(cancel)

        self.prefill_progress = progress
        return super().generate(history, system, settings, cancel)


def make(tmp_path, backend, chat_id=None):
    return ChatApp(backend, Store(tmp_path / "chats.sqlite3"), chat_id=chat_id, default_settings=GREEDY, animate=False)


def cold(model_path, content):
    """The reply and prompt size of an uninterrupted read with no cache at all."""
    backend = ModelBackend(model_path, dtype="float32", cache_budget=0)
    backend.load(lambda *_: None)
    history = [{"role": "user", "content": content}]
    last = None
    for last in backend.generate(history, None, {**DEFAULT_SETTINGS, **GREEDY}, threading.Event()):  # noqa: B007
        pass
    return backend.last_reply, last.prompt_tokens


def checkpoint_tokens(data_home, key) -> int:
    head = CacheStore(data_home / "qwen2-mlx" / "caches").peek(key)
    return len(head[1]) if head else 0


def notes(app) -> str:
    return " | ".join(n.message for n in app._notifications)


async def continue_read(pilot, app):
    """Ctrl+R, as the app offers, and the finished reply."""
    await wait_until(pilot, lambda: app.loaded, timeout=60)
    before = app.store.path(app.chat.chat_id)[-1].id
    await pilot.press("ctrl+r")
    last = lambda: app.store.path(app.chat.chat_id)[-1]  # noqa: E731
    await wait_until(pilot, lambda: last().id != before and app.chat.job is None, timeout=60)
    return last()


async def test_esc_mid_read_keeps_the_message_and_the_next_read_starts_from_there(tmp_path, model_path, doc, data_home):
    backend = Interrupting(model_path, at=0.5, then=lambda cancel: cancel.set())  # what Esc does to the job
    app = make(tmp_path, backend)
    async with app.run_test(size=(140, 30)) as pilot:
        await wait_until(pilot, lambda: app.loaded, timeout=60)
        await send(pilot, f"/file {doc}")
        await send(pilot, "Which town is in section 3?")
        user, reply = app.store.path(app.chat.chat_id)
        assert reply.status == "stopped" and reply.content == "" and user.attachments  # the message is kept
        await wait_until(pilot, lambda: "Reading stopped with at least" in notes(app))
        key = app.store.cache_key(app.chat.chat_id)
        saved = checkpoint_tokens(data_home, key)
        again = await continue_read(pilot, app)
    content = render_message([read_attachment(doc)], "Which town is in section 3?")
    want, total = cold(model_path, content)
    assert again.status == "length" and again.content == want  # max_tokens 6: cut, as the cold read
    read_again = again.stats["prompt_tokens"]
    assert total * 0.4 < saved and read_again == total - backend.chat.last_cached_tokens <= total - saved


async def test_a_quit_mid_read_resumes_from_the_checkpoint_after_a_restart(tmp_path, model_path, doc, data_home):
    app = None

    def quit_now(cancel):  # Ctrl+Q: the app exits, and its shutdown sets the job's cancel flag as done here
        cancel.set()  # (first, so a busy machine cannot let the read finish before the exit lands)
        app.call_from_thread(app.exit)

    backend = Interrupting(model_path, at=0.5, then=quit_now)
    app = make(tmp_path, backend)
    async with app.run_test(size=(140, 30)) as pilot:
        await wait_until(pilot, lambda: app.loaded, timeout=60)
        await send(pilot, f"/file {doc}")
        await send(pilot, "Which town is in section 3?", wait=False)
        await wait_until(pilot, lambda: backend.fired, timeout=60)
    chat_id = app.store.chats()[0].id
    key = app.store.cache_key(chat_id)
    saved = checkpoint_tokens(data_home, key)
    total = cold(model_path, render_message([read_attachment(doc)], "Which town is in section 3?"))
    assert total[1] * 0.4 < saved < total[1]

    reopened = make(tmp_path, ModelBackend(model_path, dtype="float32"), chat_id=chat_id)  # `qwen2-chat --last`
    async with reopened.run_test(size=(140, 30)) as pilot:
        await wait_until(pilot, lambda: "cut short" in notes(reopened), timeout=60)
        again = await continue_read(pilot, reopened)
        state = reopened.status.state + reopened.status.note
    assert again.content == total[0] and f"reused {saved:,} cached tokens" in state
    assert again.stats["prompt_tokens"] == total[1] - saved


CHILD = """
import sys, threading, time
from pathlib import Path
from qwen2_mlx.generation.attachments import read_attachment
from tui.backend import DEFAULT_SETTINGS, ModelBackend
from tui.store import Store

model, db, doc, marker = sys.argv[1:5]
STEP, EVERY = int(sys.argv[5]), int(sys.argv[6])
store = Store(Path(db))
chat = store.new_chat("crash")
user = store.add_message(chat.id, None, "user", "Which town is in section 3?", attachments=[read_attachment(doc)])
store.add_message(chat.id, user.id, "assistant", "", status="streaming")  # as the app does before reading
backend = ModelBackend(Path(model), dtype="float32", prefill_step_size=STEP, checkpoint_tokens=EVERY)
backend.load(lambda *a: None)
backend.open_chat(store.cache_key(chat.id))

def progress(done, total):
    if done >= 0.6 * total:
        Path(marker).write_text(str(done))
        time.sleep(600)  # killed here, mid-read

backend.prefill_progress = progress
for _ in backend.generate([user.as_dict()], None, {**DEFAULT_SETTINGS, "max_tokens": 6, "temperature": 0.0},
                          threading.Event()):
    pass
"""


async def test_a_crash_mid_read_kill_9_resumes_from_the_checkpoint(tmp_path, model_path, doc, data_home):
    marker = tmp_path / "reading"
    env = dict(os.environ, PYTHONPATH=str(ROOT), XDG_DATA_HOME=str(data_home), QWEN2_MLX_NO_OPENBLAS="1")
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, *map(str, (model_path, tmp_path / "chats.sqlite3", doc, marker, STEP, EVERY))],
        cwd=ROOT,
        env=env,
    )
    try:
        deadline = time.time() + 120
        while not marker.exists() and child.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert marker.exists(), "the child never got half-way through its read"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    store = Store(tmp_path / "chats.sqlite3")
    chat_id = store.chats()[0].id
    saved = checkpoint_tokens(data_home, store.cache_key(chat_id))
    want, total = cold(model_path, render_message([read_attachment(doc)], "Which town is in section 3?"))
    assert total * 0.3 < saved < total

    app = make(tmp_path, ModelBackend(model_path, dtype="float32"), chat_id=chat_id)
    async with app.run_test(size=(140, 30)) as pilot:
        await wait_until(pilot, lambda: "cut short" in notes(app), timeout=60)
        assert app.store.path(chat_id)[-1].status == "interrupted"
        again = await continue_read(pilot, app)
    assert again.content == want and again.stats["prompt_tokens"] == total - saved
