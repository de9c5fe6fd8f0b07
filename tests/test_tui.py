"""Pilot tests of the chat app (tui/) against a scripted backend: keys, streaming, stop, redo,
slash commands, storage and export. No model is loaded here."""

from __future__ import annotations

import json
import threading
from contextlib import nullcontext

import pytest
from tui_helpers import CJK_REPLY, make_app, ready, send, texts, wait_until

from tui import slash
from tui.screens.chat_list import ChatListScreen
from tui.screens.dialogs import AskScreen, ConfirmScreen, HelpScreen
from tui.screens.settings import SettingsScreen
from tui.store import Store
from tui.widgets.transcript import MessageView

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("data_home")]  # conftest.py
LONG = " ".join(f"word{i}" for i in range(200))


async def test_send_streams_markdown_reply_and_saves_it(tmp_path):
    app = make_app(tmp_path, delay=0.005)
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot)
        await send(pilot, "什么是量子计算？")
        assert texts(app) == [("user", "什么是量子计算？", "done"), ("assistant", CJK_REPLY, "done")]
        assert app.prompt.text == ""
        path = app.store.path(app.chat.chat_id)
        assert [(m.role, m.content, m.status) for m in path] == [
            ("user", "什么是量子计算？", "done"),
            ("assistant", CJK_REPLY, "done"),
        ]
        assert path[1].stats["finish_reason"] == "stop"
        assert app.title == "什么是量子计算？"
        stats = str(app.status.query_one("#status-stats").render())
        assert "TTFT 0.25s" in stats and "gen 30.0 t/s" in stats and "0.50 GB" in stats
        assert "ctx " in str(app.status.query_one("#status-context").render())
        # The reply was rendered as Markdown, with its code block as a fence.
        fences = app.transcript.views[-1].query("MarkdownFence")
        assert len(fences) == 1 and "你好，世界" in fences[0].code


async def test_newline_keys_do_not_send(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot)
        await pilot.press("a", "shift+enter", "b", "alt+enter", "c", "ctrl+j", "d")
        assert app.prompt.text == "a\nb\nc\nd"
        assert app.transcript.views == [] and app.chat.job is None
        await pilot.press("enter")
        await wait_until(pilot, lambda: len(app.transcript.views) == 2 and texts(app)[-1][2] == "done")
        assert app.transcript.views[0].content == "a\nb\nc\nd"


async def test_text_and_enter_in_one_burst_are_not_lost(tmp_path):
    # What a terminal delivers for an IME commit or fast typing: the keys arrive before any is handled.
    from textual import events

    app = make_app(tmp_path, replies=["ok"])
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot)
        for ch in "继续写完代码":
            app.post_message(events.Key(ch, ch))
        app.post_message(events.Key("enter", "\r"))
        await wait_until(
            pilot, lambda: len(app.transcript.views) == 2 and texts(app)[-1] == ("assistant", "ok", "done")
        )
        assert app.transcript.views[0].content == "继续写完代码" and app.prompt.text == ""


async def test_escape_stops_mid_stream_keeps_partial_and_app_stays_usable(tmp_path):
    app = make_app(tmp_path, replies=[LONG, "second answer"], delay=0.02)
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot)
        await send(pilot, "tell me a lot", wait=False)
        await wait_until(pilot, lambda: len(app.chat.reply_text) > 20)
        await pilot.press("escape")
        await wait_until(pilot, lambda: app.chat.job is None)
        reply = app.transcript.views[-1]
        assert reply.status == "stopped"
        assert reply.content and LONG.startswith(reply.content) and len(reply.content) < len(LONG)
        assert "stopped" in str(reply.query_one(".message-note").render())
        stored = app.store.path(app.chat.chat_id)[-1]
        assert (stored.status, stored.content) == ("stopped", reply.content)
        # The partial reply is part of the next turn's history, and the app answers again.
        await send(pilot, "go on")
        assert texts(app)[-1] == ("assistant", "second answer", "done")
        assert app.backend.calls[-1]["history"][1] == {"role": "assistant", "content": reply.content}


async def test_ctrl_c_stops_while_generating_and_asks_before_quitting(tmp_path):
    app = make_app(tmp_path, replies=[LONG], delay=0.02)
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot)
        await send(pilot, "go", wait=False)
        await wait_until(pilot, lambda: len(app.chat.reply_text) > 10)
        await pilot.press("ctrl+c")
        await wait_until(pilot, lambda: app.chat.job is None)
        assert app.transcript.views[-1].status == "stopped"
        assert app.is_running
        await pilot.press("ctrl+c")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("n")
        await wait_until(pilot, lambda: not isinstance(app.screen, ConfirmScreen))
        assert app.is_running
        await pilot.press("ctrl+c")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("ctrl+c")
        await wait_until(pilot, lambda: not app.is_running)
    assert app.return_code == 0


async def test_ctrl_q_quits(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot)
        await pilot.press("ctrl+q")
        await pilot.pause()
    assert not app.is_running


async def test_regenerate_keeps_both_replies_as_branches(tmp_path):
    app = make_app(tmp_path, replies=["first reply", "second reply"])
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot)
        await send(pilot, "hello")
        await pilot.press("ctrl+r")
        await wait_until(pilot, lambda: app.chat.job is None and app.transcript.views[-1].content == "second reply")
        reply = app.transcript.views[-1]
        assert reply.branch == (2, 2) and "2/2" in str(reply.query_one(".message-header").render())
        assert len(app.backend.calls[-1]["history"]) == 1  # regenerated from the user message only
        reply.focus()
        await pilot.press("left")
        await wait_until(pilot, lambda: app.transcript.views[-1].content == "first reply")
        assert app.transcript.views[-1].branch == (1, 2)
        await pilot.press("right")
        await wait_until(pilot, lambda: app.transcript.views[-1].content == "second reply")
        # /regen does the same as Ctrl+R
        app.backend.replies.append("third reply")
        await send(pilot, "/regen")
        assert app.transcript.views[-1].branch == (3, 3)


async def test_edit_an_earlier_message_and_switch_branches(tmp_path):
    app = make_app(tmp_path, replies=[lambda t: f"echo: {t}"])
    async with app.run_test(size=(80, 30)) as pilot:
        await ready(pilot)
        await send(pilot, "one")
        await send(pilot, "two")
        app.transcript.views[-1].focus()
        await pilot.press("up", "up", "up")  # from the last reply to the first message
        first = app.transcript.views[0]
        assert app.focused is first
        await pilot.press("e")
        assert app.prompt.text == "one" and app.chat.edit_target is not None
        app.prompt.set_text("uno")
        await pilot.press("enter")
        await wait_until(
            pilot,
            lambda: (
                app.chat.job is None
                and len(app.transcript.views) == 2
                and app.transcript.views[-1].content == "echo: uno"
            ),
        )
        assert texts(app) == [("user", "uno", "done"), ("assistant", "echo: uno", "done")]
        assert app.transcript.views[0].branch == (2, 2)
        assert app.backend.calls[-1]["history"] == [{"role": "user", "content": "uno"}]
        app.transcript.views[0].focus()
        await pilot.press("left")
        await wait_until(pilot, lambda: len(app.transcript.views) == 4)
        assert [v.content for v in app.transcript.views] == ["one", "echo: one", "two", "echo: two"]
        # nothing is lost in the file either
        assert len(Store(tmp_path / "chats.sqlite3").children(app.chat.chat_id, None)) == 2


async def test_slash_commands(tmp_path):
    app = make_app(tmp_path, replies=["one two three four five six seven eight"])
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot)
        await send(pilot, "hi")
        chat_id = app.chat.chat_id
        await send(pilot, "/set temp 0.2")
        await send(pilot, "/set top_p 0.9")
        await send(pilot, "/max 3")
        await send(pilot, "/system You answer in haiku.")
        rec = app.store.chat(chat_id)
        assert rec.settings["temperature"] == 0.2 and rec.settings["top_p"] == 0.9
        assert rec.settings["max_tokens"] == 3 and rec.system == "You answer in haiku."
        await send(pilot, "again")
        call = app.backend.calls[-1]
        assert call["system"] == "You answer in haiku." and call["settings"]["temperature"] == 0.2
        reply = app.transcript.views[-1]
        assert reply.status == "length" and "max tokens" in str(reply.query_one(".message-note").render())
        assert app.store.path(chat_id)[-1].status == "length"
        # a bad command is reported and the text stays in the prompt
        app.prompt.set_text("/set temp hot")
        await pilot.press("enter")
        await wait_until(pilot, lambda: any("temp needs a number" in n.message for n in app._notifications))
        assert app.prompt.text == "/set temp hot"
        app.prompt.set_text("")
        await send(pilot, "/help")
        await wait_until(pilot, lambda: isinstance(app.screen, HelpScreen))
        assert app.screen.commands == slash.help_rows()  # the page lists the command table
        await pilot.press("escape")
        await wait_until(pilot, lambda: not isinstance(app.screen, HelpScreen))
        await send(pilot, "/clear")
        assert app.chat.chat_id is None and app.transcript.views == []
        assert app.chat.settings["temperature"] == 0.2  # /clear keeps this chat's settings
        assert app.store.chat(chat_id) is not None  # the old chat is kept
        await send(pilot, "/model")
        assert any("fake-model" in n.message for n in app._notifications)
        await send(pilot, "//etc/hosts is a file")
        assert app.transcript.views[0].content == "/etc/hosts is a file"


async def test_f1_lists_the_bindings_and_the_command_table(tmp_path, data_home):
    app = make_app(tmp_path)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        await pilot.press("f1")
        await wait_until(pilot, lambda: isinstance(app.screen, HelpScreen))
        assert app.screen.commands == slash.help_rows()
        ids = [i for i, _, _ in app.screen.bindings]
        assert {"app.stop", "app.regenerate", "prompt.submit", "message.edit", "chats.delete"} <= set(ids)
        await pilot.press("escape")
        await wait_until(pilot, lambda: not isinstance(app.screen, HelpScreen))


async def test_prompt_history_persists_across_restart(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot)
        await send(pilot, "first prompt")
        await send(pilot, "second\nprompt")
    app2 = make_app(tmp_path)
    async with app2.run_test(size=(80, 24)) as pilot:
        await ready(pilot)
        app2.prompt.set_text("draft")
        await pilot.press("home", "up")
        assert app2.prompt.text == "second\nprompt"
        await pilot.press("up")
        assert app2.prompt.text == "first prompt"
        await pilot.press("down")
        await pilot.press("down", "down")  # from the first line of "second\nprompt" to its last, then on
        assert app2.prompt.text == "draft"


async def test_reopen_chat_from_the_list_and_rename_delete(tmp_path):
    app = make_app(tmp_path, replies=[lambda t: f"re: {t}"])
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        await send(pilot, "alpha")
        alpha = app.chat.chat_id
        await pilot.press("ctrl+n")
        await send(pilot, "beta")
        assert app.chat.chat_id != alpha
        await pilot.press("ctrl+l")
        await wait_until(pilot, lambda: isinstance(app.screen, ChatListScreen))
        await pilot.press("down")  # newest first: beta, then alpha
        await pilot.press("r")
        await wait_until(pilot, lambda: isinstance(app.screen, AskScreen))
        app.screen.query_one("Input").value = "阿尔法"
        await pilot.press("enter")
        await wait_until(pilot, lambda: isinstance(app.screen, ChatListScreen))
        assert app.store.chat(alpha).title == "阿尔法"
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.chat.chat_id == alpha and len(app.transcript.views) == 2)
        assert [v.content for v in app.transcript.views] == ["alpha", "re: alpha"]
        assert app.title == "阿尔法"
        await pilot.press("ctrl+l")
        await wait_until(pilot, lambda: isinstance(app.screen, ChatListScreen))
        await pilot.press("d")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await wait_until(pilot, lambda: isinstance(app.screen, ChatListScreen))
        await pilot.press("escape")
        await wait_until(pilot, lambda: app.chat.chat_id is None)
        assert app.store.chat(alpha) is None and len(app.store.chats()) == 1


async def test_export_names_keep_chinese_titles(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot)
        await send(pilot, "量子计算入门")
        await send(pilot, "/export")
        await send(pilot, "/export jsonl")
        await send(pilot, "/export")
    md = tmp_path / "量子计算入门.md"
    assert md.exists() and (tmp_path / "量子计算入门-2.md").exists()
    body = md.read_text(encoding="utf-8")
    assert body.startswith("# 量子计算入门") and "## Assistant" in body and "叠加" in body
    rows = [json.loads(line) for line in (tmp_path / "量子计算入门.jsonl").read_text(encoding="utf-8").splitlines()]
    assert rows == [{"role": "user", "content": "量子计算入门"}, {"role": "assistant", "content": CJK_REPLY}]


async def test_engine_error_keeps_the_prompt_and_app_recovers(tmp_path):
    app = make_app(tmp_path, replies=["fine now"])
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot)
        await send(pilot, "please FAIL now")
        user, reply = app.transcript.views
        assert user.content == "please FAIL now"
        assert reply.status == "error" and "scripted" in str(reply.query_one(".message-note").render())
        stored = app.store.path(app.chat.chat_id)
        assert stored[0].content == "please FAIL now" and stored[1].status == "error"
        assert app.store.history()[-1] == "please FAIL now"
        assert any("saved" in n.message for n in app._notifications)
        await pilot.press("up")
        assert app.prompt.text == "please FAIL now"
        app.prompt.set_text("")
        await send(pilot, "hello")
        assert texts(app)[-1] == ("assistant", "fine now", "done")
        # the failed reply is not part of what the model is given
        assert app.backend.calls[-1]["history"] == [
            {"role": "user", "content": "please FAIL now"},
            {"role": "user", "content": "hello"},
        ]


async def test_reply_interrupted_by_a_crash_is_kept_and_marked(tmp_path):
    store = Store(tmp_path / "chats.sqlite3")
    chat = store.new_chat("crashed")
    u = store.add_message(chat.id, None, "user", "my long prompt")
    store.add_message(chat.id, u.id, "assistant", "half an ans", status="streaming")
    store.close()
    app = make_app(tmp_path)
    app.chat.chat_id = chat.id
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot)
        assert texts(app) == [("user", "my long prompt", "done"), ("assistant", "half an ans", "interrupted")]


async def test_keymap_file_rebinds_keys(tmp_path, data_home):
    (data_home / "qwen2-mlx").mkdir(parents=True)
    (data_home / "qwen2-mlx" / "keymap.json").write_text(
        json.dumps({"prompt.submit": "ctrl+j", "prompt.newline": "enter,shift+enter", "app.regenerate": "f5"})
    )
    app = make_app(tmp_path, replies=["one", "two"])
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot)
        await pilot.press("a", "enter", "b")
        assert app.prompt.text == "a\nb" and app.transcript.views == []
        await pilot.press("ctrl+j")
        await wait_until(
            pilot, lambda: len(app.transcript.views) == 2 and texts(app)[-1] == ("assistant", "one", "done")
        )
        assert app.transcript.views[0].content == "a\nb"
        await pilot.press("f5")
        await wait_until(pilot, lambda: texts(app)[-1] == ("assistant", "two", "done"))


async def test_ctrl_g_edits_the_prompt_in_editor(tmp_path, monkeypatch):
    script = tmp_path / "editor.sh"
    script.write_text('#!/bin/sh\nprintf "edited 編集\\nline two\\n" > "$1"\n')
    script.chmod(0o755)
    monkeypatch.setenv("VISUAL", str(script))
    app = make_app(tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot)
        monkeypatch.setattr(app, "suspend", nullcontext)  # headless: nothing to hand the terminal to
        await pilot.press("x", "ctrl+g")
        await wait_until(pilot, lambda: app.prompt.text == "edited 編集\nline two")


async def test_copy_message_and_code_block(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot)
        await send(pilot, "code please")
        reply = app.transcript.views[-1]
        reply.focus()
        await pilot.press("y")
        assert app.clipboard == CJK_REPLY
        await pilot.press("c")
        assert app.clipboard == "print('你好，世界')\n"
        await send(pilot, "/copy")
        assert app.clipboard == CJK_REPLY
        # Ctrl+C copies text selected with the mouse (and then does not stop or quit)
        app.prompt.focus()
        app.screen.get_selected_text = lambda: "量子计算"
        await pilot.press("ctrl+c")
        assert app.clipboard == "量子计算" and not isinstance(app.screen, ConfirmScreen)


async def test_theme_is_remembered(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot)
        app.theme = "nord"
        await pilot.pause()
    app2 = make_app(tmp_path)
    async with app2.run_test(size=(80, 24)) as pilot:
        await ready(pilot)
        assert app2.theme == "nord"


async def test_context_meter_warns_and_cut_by_context_is_shown(tmp_path):
    app = make_app(tmp_path, replies=[LONG], context_limit=60)
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot)
        await send(pilot, "fill it up")
        reply = app.transcript.views[-1]
        assert reply.status == "context" and "context window is full" in str(reply.query_one(".message-note").render())
        ctx = app.status.query_one("#status-context")
        assert ctx.has_class("-warn") and "⚠" in str(ctx.render())
        # the next turn does not fit at all: refused, said so, the message kept
        await send(pilot, "and more")
        reply = app.transcript.views[-1]
        assert reply.status == "context" and "context window is full" in str(reply.query_one(".message-note").render())
        assert [m.content for m in app.store.path(app.chat.chat_id)][-2] == "and more"
        assert any("more than the context window" in n.message for n in app._notifications)


async def test_settings_panel_saves_per_chat(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=(100, 40)) as pilot:
        await ready(pilot)
        await send(pilot, "hi")
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: isinstance(app.screen, SettingsScreen))
        screen = app.screen
        screen.query_one("#system").text = "Be brief."
        screen.query_one("#set-temperature").value = "0.3"
        screen.query_one("#set-max_tokens").value = ""
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: not isinstance(app.screen, SettingsScreen))
        rec = app.store.chat(app.chat.chat_id)
        assert rec.system == "Be brief." and rec.settings["temperature"] == 0.3
        assert rec.settings["max_tokens"] is None
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: isinstance(app.screen, SettingsScreen))
        app.screen.query_one("#set-top_p").value = "2"
        await pilot.press("ctrl+s")
        await wait_until(
            pilot, lambda: "top_p must be between" in str(app.screen.query_one("#settings-error").render())
        )


async def test_load_failure_exits_with_status_2(tmp_path):
    app = make_app(tmp_path, load_error="weights are damaged")
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_until(pilot, lambda: not app.is_running, timeout=5)
    assert app.return_code == 2


async def test_send_while_loading_waits_for_the_model(tmp_path):
    gate = threading.Event()
    app = make_app(tmp_path, replies=["late but here"], load_gate=gate)
    async with app.run_test(size=(80, 24)) as pilot:
        await send(pilot, "early", wait=False)
        await wait_until(pilot, lambda: app.chat.job is not None and app.transcript.views[-1].status == "waiting")
        await wait_until(pilot, lambda: "100%" in str(app.status.query_one("#status-state").render()))
        assert "Loading model" in str(app.status.query_one("#status-state").render())
        assert app.store.path(app.chat.chat_id)[0].content == "early"  # saved before the model is even there
        gate.set()
        await wait_until(pilot, lambda: app.chat.job is None and texts(app)[-1][2] == "done")
        assert texts(app)[-1] == ("assistant", "late but here", "done")


def test_message_view_is_focusable():
    assert MessageView.can_focus


async def test_model_command_lists_and_switches_models(tmp_path, data_home):
    from tiny import DENSE

    from tui.fake import FakeBackend
    from tui.screens.model_picker import ModelScreen

    folder = data_home / "qwen2-mlx" / "models" / "tiny-moe"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(dict(DENSE, num_experts=4)))
    (folder / "model.safetensors").write_bytes(b"")
    app = make_app(tmp_path, replies=["from A"])
    app.backend_factory = lambda path: FakeBackend([f"from {path.name}"], name=path.name)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        await send(pilot, "/model")
        await wait_until(pilot, lambda: isinstance(app.screen, ModelScreen))
        assert "tiny-moe  ·  MoE  ·  float32" in str(app.screen.query_one("OptionList").get_option_at_index(0).prompt)
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.loaded and app.model_label == "tiny-moe")
        assert app.sub_title == "tiny-moe"
        await send(pilot, "hi")
        assert texts(app)[-1] == ("assistant", "from tiny-moe", "done")
        await send(pilot, "/model /no/such/folder")
        assert any("no such model folder" in n.message for n in app._notifications)
        assert app.model_label == "tiny-moe" and app.loaded


async def test_failed_model_switch_keeps_the_old_model(tmp_path, data_home):
    from tiny import DENSE

    from tui.fake import FakeBackend

    folder = tmp_path / "broken-weights"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(DENSE))
    (folder / "model.safetensors").write_bytes(b"")
    app = make_app(tmp_path, replies=["still A"])
    app.backend_factory = lambda path: FakeBackend(name=path.name, load_error="cannot read weights")
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        await send(pilot, f"/model {folder}")
        await wait_until(pilot, lambda: any("Still using fake-model" in n.message for n in app._notifications))
        assert app.is_running and app.loaded and app.model_label == "fake-model"
        await send(pilot, "hi")
        assert texts(app)[-1] == ("assistant", "still A", "done")


async def test_view_follows_the_stream_until_the_user_scrolls_up(tmp_path):
    long = "\n\n".join(f"段落 {i}：这是一个用来测试自动滚动的长段落。" for i in range(60))
    app = make_app(tmp_path, replies=[long], delay=0.01)
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot)
        await send(pilot, "long", wait=False)
        await wait_until(pilot, lambda: app.chat.reply_text.count("段落") > 15)
        t = app.transcript
        await pilot.pause()
        assert t.max_scroll_y > 0 and t.scroll_y == t.max_scroll_y  # following
        t.focus()
        await pilot.press("pageup")
        y = t.scroll_y
        await wait_until(pilot, lambda: app.chat.reply_text.count("段落") > 25)
        await pilot.pause()
        assert t.scroll_y == y < t.max_scroll_y  # left where the reader put it
        await pilot.press("escape")
        await wait_until(pilot, lambda: app.chat.job is None)


async def test_long_prompt_shows_reading_progress(tmp_path, monkeypatch):
    from tui.widgets.status import StatusBar

    states = []
    original = StatusBar.set_state
    monkeypatch.setattr(StatusBar, "set_state", lambda self, text: (states.append(text), original(self, text)))
    app = make_app(tmp_path, replies=["ok"])
    async with app.run_test(size=(100, 24)) as pilot:
        await ready(pilot)
        await send(pilot, "长 " * 700)
        assert any(s.startswith("reading the prompt") and "/70" in s for s in states), states
        assert states[-1] == "ready"
