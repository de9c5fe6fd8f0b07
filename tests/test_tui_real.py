"""The chat app end to end with the real Qwen2.5-Coder-0.5B-Instruct (float32): a Chinese question
gets a Chinese answer, in the app and from `qwen2-chat --prompt`; regenerate, edit and a jump
to another branch reuse the KV cache up to the branch point."""

from __future__ import annotations

import re
import threading

import pytest

from tui.backend import DEFAULT_SETTINGS, ModelBackend

pytest.importorskip("qwen2_mlx.generation.chat")
pytestmark = pytest.mark.real_model

CJK = re.compile(r"[\u3400-\u9fff]")
QUESTION = "请用中文回答：天空是什么颜色？"


@pytest.mark.anyio
async def test_app_answers_a_chinese_question_in_chinese(real_model_path, tmp_path, monkeypatch):
    from tui_helpers import send, wait_until

    from tui.app import ChatApp
    from tui.store import Store

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    backend = ModelBackend(real_model_path, dtype="float32")
    app = ChatApp(
        backend,
        Store(tmp_path / "chats.sqlite3"),
        default_settings={"max_tokens": 16, "temperature": 0.0},
        animate=False,
    )
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_until(pilot, lambda: app.loaded, timeout=300)
        await send(pilot, QUESTION, wait=False)
        await wait_until(
            pilot, lambda: app.chat.job is None and app.transcript.views[-1].status != "streaming", timeout=300
        )
        reply = app.transcript.views[-1]
        assert reply.status in ("done", "length"), reply.error
        assert CJK.search(reply.content), reply.content
        stored = app.store.path(app.chat.chat_id)
        assert [m.role for m in stored] == ["user", "assistant"] and stored[1].content == reply.content
        stats = str(app.status.query_one("#status-stats").render())
        assert "TTFT" in stats and "t/s" in stats
        assert "ctx " in str(app.status.query_one("#status-context").render())


def test_prompt_flag_prints_a_chinese_reply(real_model_path, capsys):
    from tui.__main__ import main

    code = main(
        [
            "--model",
            str(real_model_path),
            "--dtype",
            "float32",
            "--prompt",
            QUESTION,
            "--max-tokens",
            "16",
            "--temp",
            "0",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and CJK.search(out), out


def test_backend_reuses_the_cache_for_turns_regenerate_edit_jump_and_stop(real_model_path):
    backend = ModelBackend(real_model_path, dtype="float32")
    backend.load(lambda *_: None)
    settings = {**DEFAULT_SETTINGS, "max_tokens": 6, "temperature": 0.0}

    def run(history):
        last = None
        for last in backend.generate(history, None, settings, threading.Event()):  # noqa: B007 (read after the loop)
            pass
        return backend.last_reply, last.prompt_tokens

    first = [{"role": "user", "content": QUESTION}]
    a, full = run(first)
    turn = first + [{"role": "assistant", "content": a}, {"role": "user", "content": "为什么？"}]
    b, new_turn = run(turn)
    b2, regen = run(turn)
    assert new_turn < full // 2 and regen <= 2  # only the new message, then nothing new, is prefilled
    assert b2 == b  # greedy: the same reply again, now a second branch
    edited = first + [{"role": "assistant", "content": a}, {"role": "user", "content": "那草呢？"}]
    _, edit = run(edited)
    assert edit < full // 2
    assert [m["content"] for m in backend.chat.messages if m["role"] == "user"] == [QUESTION, "那草呢？"]
    # back to the first branch and on from there: only what the cache does not share is prefilled
    jump = turn + [{"role": "assistant", "content": b}, {"role": "user", "content": "好的"}]
    _, jumped = run(jump)
    assert jumped < backend.count_tokens(jump, None) - 10
    assert [m["content"] for m in backend.chat.messages if m["role"] == "user"] == [QUESTION, "为什么？", "好的"]
    # a stop after two tokens keeps the partial reply, and the cache stays in step with it
    stop = threading.Event()
    settings_long = {**settings, "max_tokens": 50}
    history = [{"role": "user", "content": "数一数：一、二、三、四、五、六、七、八、九、十"}]
    n = 0
    for r in backend.generate(history, None, settings_long, stop):  # noqa: B007 (read after the loop)
        n += 1
        if n == 2:
            stop.set()
    assert r.finish_reason == "cancelled" and r.generation_tokens <= 3
    partial = backend.last_reply
    _, after_stop = run(history + [{"role": "assistant", "content": partial}, {"role": "user", "content": "继续"}])
    assert after_stop < 15
