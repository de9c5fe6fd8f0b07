"""`qwen2-chat --server`: the chat app against a real `qwen2-serve` process on a free port (tiny model).

The model is a tiny random one whose head never picks an end-of-turn token or an unprintable one, so a reply
runs to its `max_tokens` as plain text: long enough to stop it, or to kill the server under it. Replies are
compared with what the server answers the official `openai` client, greedy. Pilot drives the app; the last
test runs `python -m tui --server URL` in a real terminal (tmux).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
from serve_support import ROOT, ServerProcess, free_port
from tiny import DENSE, make_checkpoint
from tui_helpers import ready, send, texts, wait_until

from tui.app import ChatApp
from tui.remote import RemoteBackend, ServerError
from tui.store import Store

KEY = "chat-key-42"
NAME = "endless"
GREEDY = {"temperature": 0.0, "max_tokens": 24}
LONG = {"temperature": 0.0, "max_tokens": 3000}
CANCELLED_LINE = "a streaming client went away"


def endless_checkpoint(path: Path) -> Path:
    """A tiny checkpoint whose head rows for special, partial-UTF-8 and control tokens are zero: their logit
    is 0 while the best of the others is well above, so greedy replies are printable and never end early."""
    from safetensors.numpy import load_file, save_file
    from tokenizers import Tokenizer

    make_checkpoint(path, DENSE)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    bad = []
    for i in range(tok.get_vocab_size()):
        text = tok.decode([i])
        if not text or "\ufffd" in text or not text.replace("\n", "").isprintable():
            bad.append(i)
    weights = load_file(path / "model.safetensors")
    weights["lm_head.weight"][bad] = 0
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return endless_checkpoint(tmp_path_factory.mktemp("tuiserver") / NAME)


def start_server(model_path: Path, log: Path, port=None) -> ServerProcess:
    return ServerProcess(model_path, "--api-key", KEY, "--log-level", "info", "--no-cache-dir", log=log, port=port)


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    s = start_server(model_path, tmp_path_factory.mktemp("serve-log") / "server.log")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def greedy(oai, messages: list[dict], max_tokens: int):
    return oai.chat.completions.create(model=NAME, messages=messages, max_tokens=max_tokens, temperature=0)


class Recording(RemoteBackend):
    """The real backend, noting each request's body and how many pieces each reply streamed in."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.sent: list[dict] = []
        self.pieces = 0

    def request(self, history, system, settings):
        body = super().request(history, system, settings)
        self.sent.append(body)
        return body

    def generate(self, history, system, settings, cancel):
        self.pieces = 0
        for r in super().generate(history, system, settings, cancel):
            self.pieces += bool(r.text)
            yield r


def chat_app(url: str, tmp_path: Path, settings: dict) -> ChatApp:
    backend = Recording(url, api_key=KEY)
    return ChatApp(backend, Store(tmp_path / "chats.sqlite3"), default_settings=settings, animate=False)


def status_text(app, part: str) -> str:
    return str(app.status.query_one(f"#status-{part}").render())


async def wait_reply(pilot, timeout: float = 120) -> None:
    app = pilot.app
    await wait_until(
        pilot,
        lambda: app.chat.job is None and app.transcript.views[-1].status not in ("streaming", "waiting", "stopping"),
        timeout=timeout,
    )


pytestmark = pytest.mark.usefixtures("data_home")


@pytest.mark.anyio
async def test_replies_stream_and_equal_the_servers_greedy_ones_through_regenerate_edit_and_branches(
    server, oai, tmp_path
):
    app = chat_app(server.url, tmp_path, GREEDY)
    async with app.run_test(size=(110, 32)) as pilot:
        await ready(pilot)
        window = oai.models.list().data[0].model_dump()["context_window"]  # what the server says it holds
        assert app.model_label == f"{NAME} @ 127.0.0.1:{server.port}" and app.context_limit == window
        await send(pilot, "Hello there")
        want = greedy(oai, [{"role": "user", "content": "Hello there"}], 24)
        assert texts(app)[-1] == ("assistant", want.choices[0].message.content, "length")
        p = want.usage.prompt_tokens
        assert f"prompt {p} tok (" in status_text(app, "stats") and "server" in status_text(app, "stats")
        assert status_text(app, "context").startswith(f"ctx {p + 24}/{window:,}")  # from the server's usage
        stored = app.store.path(app.chat.chat_id)[-1]
        assert stored.content == want.choices[0].message.content and stored.stats["finish_reason"] == "length"

        await pilot.press("ctrl+r")  # regenerate: the same greedy reply, its prompt from the server's cache
        await wait_reply(pilot)
        assert texts(app)[-1][1] == want.choices[0].message.content and app.transcript.views[-1].branch == (2, 2)
        assert f"prompt {p} tok ({p - 1} cached)" in status_text(app, "stats")

        await send(pilot, "And then?")
        history = [
            {"role": "user", "content": "Hello there"},
            {"role": "assistant", "content": want.choices[0].message.content},
            {"role": "user", "content": "And then?"},
        ]
        assert app.backend.sent[-1]["messages"] == history
        assert texts(app)[-1][1] == greedy(oai, history, 24).choices[0].message.content

        app.transcript.views[-2].focus()  # edit "And then?": a new branch, the edited history sent
        await pilot.press("e")
        app.prompt.set_text("Tell me more")
        await pilot.press("enter")
        await wait_reply(pilot)
        edited = history[:2] + [{"role": "user", "content": "Tell me more"}]
        assert app.backend.sent[-1]["messages"] == edited and app.transcript.views[-2].branch == (2, 2)
        assert texts(app)[-1][1] == greedy(oai, edited, 24).choices[0].message.content

        app.transcript.views[-2].focus()  # back to the first branch: it is shown as it was
        await pilot.press("left")
        await wait_until(pilot, lambda: app.transcript.views[-2].content == "And then?")
        await send(pilot, "Go on")
        assert app.backend.sent[-1]["messages"] == history + [
            {"role": "assistant", "content": texts(app)[-3][1]},
            {"role": "user", "content": "Go on"},
        ]
        assert app.store.path(app.chat.chat_id)[-1].status == "length"


@pytest.mark.anyio
async def test_escape_closes_the_stream_and_the_server_cancels(server, tmp_path):
    app = chat_app(server.url, tmp_path, LONG)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        before = server.health()["finished"].get("cancelled", 0)
        await send(pilot, "Write a long story.", wait=False)
        await wait_until(pilot, lambda: len(app.chat.reply_text) > 40, timeout=120)
        await pilot.press("escape")
        await wait_reply(pilot)
        reply = app.store.path(app.chat.chat_id)[-1]
        assert reply.status == "stopped" and reply.content and reply.stats["finish_reason"] == "cancelled"
        assert app.backend.pieces >= 3  # it streamed in pieces before the stop
        health = server.wait_idle(timeout=10)  # 3000 tokens would take far longer: the server stopped
        assert health["finished"]["cancelled"] == before + 1
        assert CANCELLED_LINE in server.log.read_text()
        app.chat.settings["max_tokens"] = 5  # the app goes on
        await send(pilot, "Short, please.")
        assert texts(app)[-1][2] == "length" and app.store.path(app.chat.chat_id)[-1].content


@pytest.mark.anyio
async def test_a_server_killed_mid_reply_keeps_the_partial_reply_and_a_restarted_one_answers(model_path, tmp_path):
    first = start_server(model_path, tmp_path / "first.log")
    app = chat_app(first.url, tmp_path, LONG)
    try:
        async with app.run_test(size=(100, 30)) as pilot:
            await ready(pilot)
            await send(pilot, "Write a long story.", wait=False)
            await wait_until(pilot, lambda: len(app.chat.reply_text) > 40, timeout=120)
            first.proc.kill()  # SIGKILL: no goodbye on the socket beyond the kernel's
            first.proc.wait()
            await wait_reply(pilot, timeout=30)
            user, reply = app.store.path(app.chat.chat_id)
            assert user.content == "Write a long story." and reply.status == "error"
            assert reply.content and app.transcript.views[-1].content == reply.content
            assert "went away mid-reply" in reply.stats["error"]
            assert "went away mid-reply" in app.transcript.views[-1].note_text()

            app.chat.settings["max_tokens"] = 6
            await send(pilot, "Are you there?")  # the server is down: one error line, nothing lost
            assert texts(app)[-1][2] == "error" and "cannot reach the server" in app.transcript.views[-1].error
            assert [m.content for m in app.store.path(app.chat.chat_id) if m.role == "user"] == [
                "Write a long story.",
                "Are you there?",
            ]
            second = start_server(model_path, tmp_path / "second.log", port=first.port)
            try:
                await pilot.press("ctrl+r")  # the same prompt again, now answered
                await wait_reply(pilot)
                assert texts(app)[-1][2] == "length" and texts(app)[-1][1]
                assert app.backend.sent[-1]["messages"][-1] == {"role": "user", "content": "Are you there?"}
            finally:
                second.stop()
    finally:
        first.stop()


def test_no_server_a_bad_url_and_a_wrong_key_are_one_line_each(server, capsys, monkeypatch):
    from tui.__main__ import main

    dead = f"http://127.0.0.1:{free_port()}"
    assert main(["--server", dead, "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("qwen2-chat: error: cannot reach the server") and "Traceback" not in "\n".join(err)
    assert main(["--server", "localhost:8080", "--prompt", "hi"]) == 2
    assert "expected a URL like http://" in capsys.readouterr().err
    monkeypatch.delenv("QWEN2_CHAT_API_KEY", raising=False)
    assert main(["--server", server.url, "--prompt", "hi"]) == 2
    assert "refused the API key (401)" in capsys.readouterr().err
    assert main(["--server", server.url, "--kv-bits", "4", "--prompt", "hi"]) == 2
    assert "--kv-bits acts on a local model" in capsys.readouterr().err
    with pytest.raises(ServerError, match="has no model 'nope'; it serves: endless"):
        RemoteBackend(server.url, api_key=KEY, model_id="nope").load(lambda *_: None)


def test_prompt_flag_prints_the_servers_reply(server, oai, capsys, monkeypatch):
    from tui.__main__ import main

    monkeypatch.setenv("QWEN2_CHAT_API_KEY", KEY)
    assert main(["--server", server.url, "--prompt", "Hello there", "--max-tokens", "12", "--temp", "0"]) == 0
    want = greedy(oai, [{"role": "user", "content": "Hello there"}], 12).choices[0].message.content
    assert capsys.readouterr().out == want + "\n"


class Terminal:
    """`python -m tui --server URL` in a detached tmux session of 160×40, read through capture-pane."""

    def __init__(self, url: str, tmp_path: Path):
        self.name = f"qwen2-chat-test-{os.getpid()}-{time.monotonic_ns()}"
        self.db = tmp_path / "chats.sqlite3"
        env = {
            "XDG_DATA_HOME": tmp_path / "data",
            "QWEN2_CHAT_API_KEY": KEY,
            "PYTHONPATH": ROOT,
            "TERM": "xterm-256color",
        }
        args = [sys.executable, "-m", "tui", "--server", url, "--temp", "0", "--max-tokens", "8000", "--db", self.db]
        command = "env -u COLUMNS -u LINES " + " ".join(f"{k}={shlex.quote(str(v))}" for k, v in env.items())
        command += " " + " ".join(shlex.quote(str(a)) for a in args)
        subprocess.run(
            ["tmux", "new-session", "-d", "-s", self.name, "-x", "160", "-y", "40", "-c", ROOT, command], check=True
        )

    def screen(self) -> str:
        out = subprocess.run(["tmux", "capture-pane", "-p", "-t", self.name], capture_output=True, text=True)
        return out.stdout

    def keys(self, *keys: str) -> None:
        subprocess.run(["tmux", "send-keys", "-t", self.name, *keys], check=True)

    def type(self, text: str) -> None:
        subprocess.run(["tmux", "send-keys", "-t", self.name, "-l", text], check=True)
        self.keys("Enter")

    def wait_for(self, cond, what: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        seen = []  # the status lines on the way, for the failure message
        while time.monotonic() < deadline:
            screen = self.screen()
            if cond(screen):
                return screen
            lines = screen.rstrip("\n").splitlines()
            if len(lines) >= 2 and (not seen or seen[-1] != lines[-2]):
                seen.append(lines[-2])
            time.sleep(0.2)
        shown = "\n".join(seen[-20:])
        raise AssertionError(f"timed out waiting for {what}; status lines:\n{shown}\nthe screen:\n{self.screen()}")

    def close(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.name], capture_output=True)

    def replies(self) -> list[tuple[str, str]]:
        import sqlite3

        with sqlite3.connect(self.db) as db:
            return db.execute("SELECT content, status FROM messages WHERE role='assistant' ORDER BY id").fetchall()


def streaming(screen: str) -> bool:
    """The status bar (the line above the footer) shows a reply being written and its first figures."""
    lines = screen.rstrip("\n").splitlines()
    status = lines[-2] if len(lines) >= 2 else ""
    return "answering" in status and "TTFT" in status


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_in_a_real_terminal_esc_cancels_on_the_server_and_a_killed_server_costs_nothing(model_path, tmp_path):
    srv = start_server(model_path, tmp_path / "tmux-first.log")
    term = Terminal(srv.url, tmp_path)
    restarted = None
    try:
        term.wait_for(lambda s: f"{NAME} @ 127.0.0.1:{srv.port}" in s and "ready" in s, "the app to connect")
        term.type("Write a long story.")
        term.wait_for(streaming, "the reply to stream")
        term.keys("Escape")
        term.wait_for(lambda s: "stopped" in s, "the stop")
        srv.wait_idle(timeout=10)
        assert srv.health()["finished"].get("cancelled") == 1
        assert CANCELLED_LINE in srv.log.read_text()
        assert term.replies()[-1][1] == "stopped" and term.replies()[-1][0]

        term.type("Another long one.")
        term.wait_for(streaming, "the second reply to stream")
        srv.proc.kill()  # SIGKILL mid-reply
        srv.proc.wait()
        term.wait_for(lambda s: "went away" in s and "Ctrl+R retries" in s, "the broken reply's error line")
        content, status = term.replies()[-1]
        assert status == "error" and content  # the partial reply is kept, marked

        term.type("/max 8")  # the app is still usable
        restarted = start_server(model_path, tmp_path / "tmux-second.log", port=srv.port)
        term.type("Hello again?")
        term.wait_for(
            lambda s: "cut at the reply limit" in s and "cut at max tokens" in s, "the restarted server's reply"
        )
        content, status = term.replies()[-1]
        assert status == "length" and content
    finally:
        term.close()
        srv.stop()
        if restarted is not None:
            restarted.stop()


@pytest.fixture
def strict_server():
    """A server as strict as OpenAI's own API: a field it does not define (top_k, …) is a 400 naming it.
    It serves one model and streams a fixed two-piece reply with `usage`, over real HTTP (uvicorn)."""
    import json
    import threading

    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    known = {"model", "messages", "temperature", "top_p", "max_tokens", "seed", "stream", "stream_options"}
    bodies: list[dict] = []

    async def models(request):
        return JSONResponse({"object": "list", "data": [{"id": "strict", "object": "model", "created": 0}]})

    async def chat(request):
        body = await request.json()
        bodies.append(body)
        unknown = sorted(set(body) - known)
        if unknown:
            error = {"message": f"Unrecognized request argument supplied: {', '.join(unknown)}", "type": "invalid"}
            return JSONResponse({"error": error}, status_code=400)

        def chunk(delta, finish=None, usage=None):
            choices = [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}]
            c = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "strict", "choices": choices}
            return f"data: {json.dumps(c | ({'usage': usage} if usage else {}))}\n\n"

        usage = {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
        parts = [chunk({"role": "assistant", "content": "o"}), chunk({"content": "k"}), chunk({}, "stop")]
        parts += [chunk({}, usage=usage), "data: [DONE]\n\n"]
        return StreamingResponse(iter(parts), media_type="text/event-stream")

    routes = [Route("/v1/models", models), Route("/v1/chat/completions", chat, methods=["POST"])]
    server = uvicorn.Server(uvicorn.Config(Starlette(routes=routes), port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{server.config.port}", bodies
    server.should_exit = True
    thread.join(10)


def test_a_strict_server_that_refuses_top_k_is_asked_again_without_the_extras(strict_server):
    import threading

    from tui.backend import DEFAULT_SETTINGS

    url, bodies = strict_server
    backend = RemoteBackend(url)
    backend.load(lambda *_: None)
    assert backend.name.startswith("strict @ ") and backend.context_limit == 0  # no window said: none shown
    replies = list(backend.generate([{"role": "user", "content": "hi"}], None, DEFAULT_SETTINGS, threading.Event()))
    assert backend.last_reply == "ok" and replies[-1].finish_reason == "stop" and backend.context_used == 9
    assert set(bodies[0]) > {"top_k", "min_p", "repetition_penalty"} and "top_k" not in bodies[1]
    assert backend.cache_note == ("the server refused top_k, min_p, repetition_penalty; sent without them", True)
    list(backend.generate([{"role": "user", "content": "again"}], None, DEFAULT_SETTINGS, threading.Event()))
    assert len(bodies) == 3 and "top_k" not in bodies[2] and backend.cache_note is None  # said once


def test_settings_that_need_a_local_model_are_kept_and_say_why_they_do_nothing():
    import asyncio

    from tui import commands, slash

    backend = RemoteBackend("http://127.0.0.1:9")

    class Chat:  # the part of ChatScreen the handler uses, with a server's backend
        settings: dict = {}
        notes: list = []

        def save_chat_settings(self):
            pass

        def notify(self, text, **kw):
            self.notes.append(text)

        def local_only(self, key):
            return backend.local_only(key)

        def set_cache_disk(self, budget):
            raise AssertionError("no disk budget is set for a server's model")

    chat = Chat()
    for text in ("/set kv-bits 4", "/set cache-disk 1GB", "/set temp 0.3"):
        cmd = commands.parse(text)
        asyncio.run(slash.find(cmd.name).handler(chat, cmd))
    assert chat.settings == {"kv_bits": 4, "temperature": 0.3}
    assert chat.notes[0] == "kv_bits does nothing here: " + backend.local_only("kv_bits")
    assert "prefix cache" in chat.notes[1] and chat.notes[2] == "temperature = 0.3"
    # a chat that has them set says so once, at its next reply, and is answered without them
    assert backend._ignored({"kv_bits": 4, "lookup": True})[0].startswith("ignored here: KV-cache quantization")
    assert backend._ignored({"kv_bits": 4, "lookup": True}) is None
