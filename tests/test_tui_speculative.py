"""Speculative decoding in the chat app: --lookup, --draft-model, /set lookup, the status bar figures."""

from __future__ import annotations

import io
import threading

import pytest
from api_support import tiny_model
from tui_helpers import make_app, ready, send

from tui import commands
from tui.__main__ import build_parser, main, run_once, settings_from
from tui.backend import DEFAULT_SETTINGS, ModelBackend

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("data_home")]  # conftest.py


def test_set_lookup_on_and_off():
    assert commands.parse("/set lookup on").key == "lookup" and commands.parse("/set lookup on").value is True
    assert commands.parse("/set lookup OFF").value is False
    with pytest.raises(commands.CommandError, match="lookup must be on or off"):
        commands.parse("/set lookup maybe")


def test_command_line_switches(tmp_path, tmp_path_factory, capsys):
    args = build_parser().parse_args(["--lookup", "--draft-model", "d", "--num-draft-tokens", "5"])
    assert settings_from(args)["lookup"] is True and args.num_draft_tokens == 5
    assert "lookup" not in settings_from(build_parser().parse_args([]))
    _, _, model = tiny_model(tmp_path_factory)
    assert main(["--model", str(model), "--draft-model", str(tmp_path / "nope"), "--prompt", "hi"]) == 2
    assert "--draft-model" in capsys.readouterr().err
    assert main(["--model", str(model), "--num-draft-tokens", "0", "--prompt", "hi"]) == 2
    assert "at least 1" in capsys.readouterr().err


async def test_status_bar_shows_acceptance_only_with_lookup(tmp_path):
    app = make_app(tmp_path, replies=["one two three four five six seven eight"])
    async with app.run_test(size=(100, 24)) as pilot:
        await ready(pilot)
        await send(pilot, "hi")
        assert "accept" not in str(app.status.query_one("#status-stats").render())
        await send(pilot, "/set lookup on")
        assert app.store.chat(app.chat.chat_id).settings["lookup"] is True
        await send(pilot, "again")
        assert app.backend.calls[-1]["settings"]["lookup"] is True
        stats = str(app.status.query_one("#status-stats").render())
        assert "accept 50%" in stats and "2.0 t/fwd" in stats  # 8 tokens: 8 proposed, 4 kept, 4 forwards
        await send(pilot, "/set lookup off")
        await send(pilot, "once more")
        assert "accept" not in str(app.status.query_one("#status-stats").render())


def test_model_backend_lookup_and_draft_equal_plain(tmp_path_factory):
    """The real backend over Chat on a tiny model: same replies with and without speculation."""
    _, _, path = tiny_model(tmp_path_factory)
    settings = {**DEFAULT_SETTINGS, "temperature": 0.0, "max_tokens": 24}

    def reply(backend, extra):
        out = io.StringIO()
        assert run_once(backend, "The quick brown fox", None, {**settings, **extra}, out, io.StringIO()) == 0
        return out.getvalue(), backend

    plain, _ = reply(ModelBackend(path), {})
    lookup, b = reply(ModelBackend(path), {"lookup": True})
    assert lookup == plain and b.chat.last_reply.stats.forward_passes > 0
    drafted, b = reply(ModelBackend(path, draft_path=path, num_draft_tokens=4), {})
    assert drafted == plain and b.chat.last_reply.stats.accepted_tokens > 0


def test_model_backend_refuses_a_draft_with_another_tokenizer(tmp_path_factory):
    _, _, path = tiny_model(tmp_path_factory)
    _, _, small = tiny_model(tmp_path_factory, vocab_size=256)
    backend = ModelBackend(path, draft_path=small)
    with pytest.raises(ValueError, match="draft model's tokenizer differs"):
        backend.load(lambda *_: None)
    out, err = io.StringIO(), io.StringIO()
    assert run_once(ModelBackend(path, draft_path=small), "hi", None, {}, out, err) == 2
    lines = [ln for ln in err.getvalue().splitlines() if "tokenizer differs" in ln]
    assert len(lines) == 1 and lines[0].startswith("qwen2-chat: cannot load the model: the draft model's")


def test_cancel_with_lookup_keeps_the_chat_in_step(tmp_path_factory):
    _, _, path = tiny_model(tmp_path_factory)
    backend = ModelBackend(path)
    backend.load(lambda *_: None)
    cancel = threading.Event()
    history = [{"role": "user", "content": "The quick brown fox"}]
    for r in backend.generate(history, None, {**DEFAULT_SETTINGS, "temperature": 0.0, "lookup": True}, cancel):
        if r.generation_tokens >= 5:
            cancel.set()
    assert r.finish_reason == "cancelled"
    chat = backend.chat
    assert chat._cache[0].offset == len(chat._cache_tokens)
    assert chat._tokens(chat.messages, False)[: len(chat._cache_tokens)] == chat._cache_tokens
