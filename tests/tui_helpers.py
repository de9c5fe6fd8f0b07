"""Shared pieces of the chat-app tests: an app over the scripted FakeBackend, and waiting helpers."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from tui.app import ChatApp
from tui.fake import FakeBackend
from tui.store import Store

CJK_REPLY = (
    "量子计算利用**叠加**和纠缠来处理信息。日本語では「量子コンピュータ」と言います。🙂\n\n"
    "```python\nprint('你好，世界')\n```\n"
)


def make_app(tmp_path: Path, replies=None, delay: float = 0.0, **backend_kw) -> ChatApp:
    backend = FakeBackend(replies or [CJK_REPLY], delay=delay, **backend_kw)
    return ChatApp(backend, Store(tmp_path / "chats.sqlite3"), animate=False)


async def wait_until(pilot, cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the app")
        await pilot.pause(0.02)


async def ready(pilot) -> None:
    await wait_until(pilot, lambda: pilot.app.loaded)


def _message_count(app) -> int:
    return app.store.db.execute("SELECT count(*) FROM messages").fetchone()[0]


async def send(pilot, text: str, wait: bool = True) -> None:
    """Type `text` and press Enter; with `wait`, return once the turn (or command) is over."""
    app = pilot.app
    before = _message_count(app)
    app.prompt.set_text(text)
    app.prompt.focus()
    await pilot.press("enter")
    if not wait:
        return
    if text.startswith("/") and not text.startswith("//"):
        await wait_until(pilot, lambda: app.prompt.text != text)
        if text.split()[0] not in ("/regen",):
            await pilot.pause()
            return
        await wait_until(pilot, lambda: _message_count(app) > before)
    else:
        await wait_until(pilot, lambda: _message_count(app) >= before + 2)
    await wait_until(
        pilot,
        lambda: (
            app.chat.job is None
            and app.chat.reply_view is None
            and (
                not app.transcript.views or app.transcript.views[-1].status not in ("streaming", "waiting", "stopping")
            )
        ),
    )
    await pilot.pause()


def texts(app) -> list[tuple[str, str, str]]:
    return [(v.role, v.content, v.status) for v in app.transcript.views]


async def settle(pilot, seconds: float = 0.05) -> None:
    await pilot.pause(seconds)
    await asyncio.sleep(0)


def model_backend(path, **kw):
    """A real `ModelBackend` over the model folder `path`, loaded (float32)."""
    from tui.backend import ModelBackend

    backend = ModelBackend(path, dtype="float32", **kw)
    backend.load(lambda *_: None)
    return backend


def backend_reply(backend, history: list, settings: dict) -> str:
    """Run one reply of `backend` to `history` on this thread; its text."""
    import threading

    for _ in backend.generate(history, None, settings, threading.Event()):
        pass
    return backend.last_reply
