"""Chat caches that survive restarts, in the chat app: a tiny real model (the cache matters here),
new app instances standing in for restarts, and the status-bar lines for loaded and ignored caches."""

from __future__ import annotations

import json
import threading

import pytest
from api_support import tiny_model
from tui_helpers import send, wait_until

from tui import commands
from tui.app import ChatApp
from tui.backend import DEFAULT_SETTINGS, ModelBackend
from tui.store import Store

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("data_home")]  # conftest.py
GREEDY = {"max_tokens": 6, "temperature": 0.0}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return tiny_model(tmp_path_factory)[2]


def caches(data_home):
    return sorted(p.name for p in (data_home / "qwen2-mlx" / "caches").glob("*.safetensors"))


def make(tmp_path, model_path, chat_id=None, dtype="float32"):
    return ChatApp(
        ModelBackend(model_path, dtype=dtype),
        Store(tmp_path / "chats.sqlite3"),
        chat_id=chat_id,
        default_settings=GREEDY,
        animate=False,
    )


def state(app) -> str:
    return str(app.status.query_one("#status-state").render())


def cold_reply(model_path, history):
    """The reply of a fresh backend with no cache at all (a full prefill)."""
    backend = ModelBackend(model_path, dtype="float32", cache_budget=0)
    backend.load(lambda *_: None)
    last = None
    for last in backend.generate(history, None, {**DEFAULT_SETTINGS, **GREEDY}, threading.Event()):  # noqa: B007
        pass
    return backend.last_reply, last.prompt_tokens


async def first_session(tmp_path, model_path) -> int:
    app = make(tmp_path, model_path)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_until(pilot, lambda: app.loaded, timeout=60)
        await send(pilot, "Hello there, tell me about the sea and the sky.")
        await send(pilot, "And the mountains?")
        chat_id = app.chat.chat_id
    return chat_id


async def test_a_reopened_chat_answers_like_a_cold_one_reading_only_the_new_message(tmp_path, model_path, data_home):
    chat_id = await first_session(tmp_path, model_path)
    assert len(caches(data_home)) == 1  # written when the replies ended
    app = make(tmp_path, model_path, chat_id=chat_id)  # a restart: `qwen2-chat --last`
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_until(pilot, lambda: "cached tokens from disk" in state(app), timeout=60)
        assert "loaded" in state(app)
        history = [m.as_dict() for m in app.store.path(chat_id)]
        await send(pilot, "What about rivers?")
        await wait_until(pilot, lambda: "reused" in state(app))
        held = int(state(app).split("reused ")[1].split()[0].replace(",", ""))
        reply = app.store.path(chat_id)[-1]
    cold, cold_prompt = cold_reply(model_path, history + [{"role": "user", "content": "What about rivers?"}])
    assert reply.content == cold
    assert reply.stats["prompt_tokens"] < cold_prompt // 3 and held == cold_prompt - reply.stats["prompt_tokens"]


async def test_corrupt_truncated_and_mismatched_files_fall_back_with_a_status_line(tmp_path, model_path, data_home):
    chat_id = await first_session(tmp_path, model_path)
    (name,) = caches(data_home)
    file = data_home / "qwen2-mlx" / "caches" / name
    good = file.read_bytes()
    damages = {
        "truncated": lambda data: data[: len(data) // 2],
        "damaged": lambda data: b"\x13" * 64 + data[64:],
        "made for other settings (dtype float32 in the file, float16": lambda data: data,
    }
    for words, damage in damages.items():
        dtype = "float16" if "dtype" in words else "float32"
        file.write_bytes(damage(good))
        app = make(tmp_path, model_path, chat_id=chat_id, dtype=dtype)
        async with app.run_test(size=(140, 30)) as pilot:
            await wait_until(pilot, lambda app=app: "ignored" in state(app), timeout=60)
            assert words in state(app) and app.status.query_one("#status-state").has_class("-warn")
            if dtype == "float32":  # the fallback answers as a cold prefill, and writes a good file again
                msgs = [m.as_dict() for m in app.store.path(chat_id)]
                await send(pilot, "Once more?")
                reply = app.store.path(chat_id)[-1]
                assert reply.content == cold_reply(model_path, msgs + [{"role": "user", "content": "Once more?"}])[0]
                assert "reused" not in state(app)
        if dtype == "float32":  # the next session of this chat loads what the fallback wrote
            app = make(tmp_path, model_path, chat_id=chat_id)
            async with app.run_test(size=(140, 30)) as pilot:
                await wait_until(pilot, lambda app=app: "cached tokens from disk" in state(app), timeout=60)
            good = file.read_bytes()


async def test_the_disk_budget_evicts_the_least_recently_used_chat(tmp_path, model_path, data_home):
    app = make(tmp_path, model_path)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_until(pilot, lambda: app.loaded, timeout=60)
        await send(pilot, "First chat, a question.")
        first = app.chat.chat_id
        await send(pilot, "/new")
        await send(pilot, "Second chat, another question.")
        second = app.chat.chat_id
        await wait_until(pilot, lambda: len(caches(data_home)) == 2)
        size = max(p.stat().st_size for p in (data_home / "qwen2-mlx" / "caches").iterdir())
        await send(pilot, f"/set cache-disk {size + 100}B")
        await wait_until(pilot, lambda: len(caches(data_home)) == 1)
        assert caches(data_home) == [app.store.cache_key(second) + ".safetensors"]  # the older one went
        assert json.loads((data_home / "qwen2-mlx" / "ui.json").read_text())["cache_disk"] == size + 100
        # deleting a chat deletes its cache; /set cache-disk off removes the rest
        app.chat_deleted(second, was_open=False)
        await wait_until(pilot, lambda: caches(data_home) == [])
        await send(pilot, "/set cache-disk off")
        await send(pilot, "Third chat.")
        await pilot.pause(0.3)
        assert caches(data_home) == [] and first != second
    app = make(tmp_path, model_path)
    assert app.cache_disk == 0 and app.backend.cache_budget == 0  # remembered across runs


def test_cache_disk_setting_parses():
    cmd = commands.parse("/set cache-disk 4GB")
    assert (cmd.key, cmd.value) == ("cache_disk", 4_000_000_000)
    assert commands.parse("/set cache_disk off").value == 0
    with pytest.raises(commands.CommandError, match="cache-disk"):
        commands.parse("/set cache-disk plenty")


def test_backend_regenerate_edit_and_branch_after_a_reopen_match_a_cold_backend(model_path, tmp_path):
    settings = {**DEFAULT_SETTINGS, **GREEDY}
    root = tmp_path / "caches"

    def run(backend, history):
        for _ in backend.generate(history, None, settings, threading.Event()):
            pass
        return backend.last_reply

    first = ModelBackend(model_path, dtype="float32", cache_root=root)
    first.load(lambda *_: None)
    first.open_chat("k")
    turn1 = [{"role": "user", "content": "Tell me about the sea."}]
    a = run(first, turn1)
    turn2 = turn1 + [{"role": "assistant", "content": a}, {"role": "user", "content": "And the sky?"}]
    b = run(first, turn2)
    assert first.persist() is None and (root / "k.safetensors").exists()
    assert first.persist() is None  # unchanged: not written again

    reopened = ModelBackend(model_path, dtype="float32", cache_root=root)
    reopened.load(lambda *_: None)
    note, _ = reopened.open_chat("k", True)
    assert note.startswith("loaded ")
    cold = ModelBackend(model_path, dtype="float32", cache_budget=0)
    cold.load(lambda *_: None)
    assert run(reopened, turn2) == run(cold, turn2) == b  # regenerate the last reply
    assert reopened.cache_note[0].startswith("reused ") and reopened.chat.last_cached_tokens > 20
    edited = turn1 + [{"role": "assistant", "content": a}, {"role": "user", "content": "And the stars?"}]
    assert run(reopened, edited) == run(cold, edited)  # an edit
    branch = turn2 + [{"role": "assistant", "content": b}, {"role": "user", "content": "Why?"}]
    assert run(reopened, branch) == run(cold, branch)  # back on the first branch and on from there


async def test_settings_panel_and_help_show_the_cache_disk_budget(tmp_path, data_home):
    from tui_helpers import make_app, ready

    from tui import slash
    from tui.screens.settings import SettingsScreen

    assert any("cache-disk" in usage + text and "4GB" in text for usage, text in slash.help_rows())
    app = make_app(tmp_path)
    async with app.run_test(size=(100, 40)) as pilot:
        await ready(pilot)
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: isinstance(app.screen, SettingsScreen))
        field = app.screen.query_one("#set-cache_disk")
        assert field.value == "4GB"
        field.value = "lots"
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert isinstance(app.screen, SettingsScreen)  # refused, with the reason shown
        assert "cache-disk" in str(app.screen.query_one("#settings-error").render())
        field.value = "2.5GB"
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: not isinstance(app.screen, SettingsScreen))
        assert app.cache_disk == 2_500_000_000 and "cache_disk" not in app.chat.settings
    assert json.loads((data_home / "qwen2-mlx" / "ui.json").read_text())["cache_disk"] == 2_500_000_000


def test_kv_bits_flag_and_command():
    from tui.__main__ import build_parser, settings_from

    assert settings_from(build_parser().parse_args(["--kv-bits", "4"]))["kv_bits"] == 4
    assert "kv_bits" not in settings_from(build_parser().parse_args([]))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--kv-bits", "3"])
    assert commands.parse("/set kv-bits 8").value == 8 and commands.parse("/set kv-bits off").value is None
    with pytest.raises(commands.CommandError, match="kv-bits must be 4, 8 or off"):
        commands.parse("/set kv-bits 5")


async def test_kv_bits_are_kept_per_chat_and_in_the_cache_files_validity(tmp_path, tmp_path_factory, data_home):
    from qwen2_mlx.generation.kv_quant import cache_bits

    # head size 64, so kv_group_size 64 divides it
    path = tiny_model(tmp_path_factory, hidden_size=128, num_attention_heads=2)[2]
    app = make(tmp_path, path)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_until(pilot, lambda: app.loaded, timeout=60)
        await send(pilot, "/set kv-bits 8")
        await send(pilot, "Hello there, a quantized chat.")
        chat_id = app.chat.chat_id
        assert app.store.chat(chat_id).settings["kv_bits"] == 8
        assert cache_bits(app.backend.chat.export_cache()[0]) == 8
    (name,) = caches(data_home)
    app = make(tmp_path, path, chat_id=chat_id)  # reopened: the chat's kv-bits choose the cache to load
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_until(pilot, lambda: "cached tokens from disk" in state(app), timeout=60)
        assert cache_bits(app.backend.chat.export_cache()[0]) == 8
        await send(pilot, "/set kv-bits off")
        await send(pilot, "Now in floats.")
        assert "quantization changed" in state(app)
        assert cache_bits(app.backend.chat.export_cache()[0]) is None
    history = [m.as_dict() for m in Store(tmp_path / "chats.sqlite3").path(chat_id)]
    cold = ModelBackend(path, dtype="float32", cache_budget=0)
    cold.load(lambda *_: None)
    for _ in cold.generate(history[:-1], None, {**DEFAULT_SETTINGS, **GREEDY}, threading.Event()):
        pass
    assert cold.last_reply == history[-1]["content"]  # the rebuilt float cache answers as a cold one
    app = make(tmp_path, path, chat_id=chat_id)
    async with app.run_test(size=(100, 30)) as pilot:  # the file was rewritten as a float cache
        await wait_until(pilot, lambda: "cached tokens from disk" in state(app), timeout=60)


def test_the_engine_saves_after_the_reply_is_out_and_at_quit():
    import time

    from tui.engine import CacheNote, Engine, Finished
    from tui.fake import FakeBackend

    class Recording(FakeBackend):
        def __init__(self):
            super().__init__(["a reply"])
            self.log = []

        def open_chat(self, key, expect=False, kv_bits=None):
            self.log.append(("open", key, kv_bits))
            return ("loaded 5 cached tokens from disk in 0.0s", False)

        def persist(self):
            self.log.append("persist")
            if len(self.log) > 3:
                raise OSError("disk full")

    events = []
    backend = Recording()
    engine = Engine(backend, events.append)
    engine.start()
    engine.submit([{"role": "user", "content": "hi"}], None, {"kv_bits": 8}, chat_key="k")
    deadline = time.monotonic() + 10
    while len(backend.log) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    kinds = [type(e).__name__ for e in events]
    assert kinds.index("CacheNote") < kinds.index("Finished")
    assert backend.log == [("open", "k", 8), "persist"]  # saved once the reply was out
    engine.open_chat("other", True, None)
    engine.shutdown()
    assert backend.log == [("open", "k", 8), "persist", ("open", "other", None), "persist"]
    assert isinstance(events[-1], CacheNote) and "disk full" in events[-1].text and events[-1].warning
    assert any(isinstance(e, Finished) for e in events)
