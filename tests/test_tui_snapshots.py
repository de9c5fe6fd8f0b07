"""Snapshot tests of the chat app at 80×24 and 120×40 with Chinese and Japanese text.

The scripted backend reports fixed statistics and nothing animates, so the screens are the same
on every run. After an intended change of the look, refresh them with
`python -m pytest tests/test_tui_snapshots.py --snapshot-update` and review the SVGs.
"""

from __future__ import annotations

import pytest
from tui_helpers import CJK_REPLY, make_app, ready, send

JA_REPLY = (
    "はい、量子コンピュータは**量子ビット**を使います。古典的なビットとは違い、0と1の重ね合わせの状態を"
    "同時に取ることができます。これにより、特定の問題を非常に速く解くことができます。"
)


@pytest.fixture(autouse=True)
def data_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)


def quiet(app) -> None:
    app.prompt.cursor_blink = False
    app.clear_notifications()


def test_chat_80x24_chinese(snap_compare, tmp_path):
    app = make_app(tmp_path)

    async def run_before(pilot):
        await ready(pilot)
        await send(pilot, "什么是量子计算？请用中文回答，并给一个 Python 例子。")
        quiet(app)
        await pilot.pause()

    assert snap_compare(app, terminal_size=(80, 24), run_before=run_before)


def test_chat_120x40_japanese_branches_and_cut(snap_compare, tmp_path):
    app = make_app(tmp_path, replies=[CJK_REPLY, JA_REPLY, JA_REPLY])

    async def run_before(pilot):
        await ready(pilot)
        await send(pilot, "量子計算とは何ですか？")
        await send(pilot, "もっと詳しく、日本語で説明してください。")
        await send(pilot, "/max 12")
        await pilot.press("ctrl+r")
        await pilot.pause(0.2)
        while app.chat.job is not None:
            await pilot.pause(0.05)
        app.prompt.set_text("下一个问题：能否用表格比较经典计算和量子计算？🙂")
        quiet(app)
        await pilot.pause()

    assert snap_compare(app, terminal_size=(120, 40), run_before=run_before)


def test_empty_chat_with_cjk_input_80x24(snap_compare, tmp_path):
    app = make_app(tmp_path)

    async def run_before(pilot):
        await ready(pilot)
        app.prompt.set_text(
            "请解释一下这段代码的作用，並且用日本語でもう一度説明してください。"
            "長い行は正しく折り返されるべきです。\n第二行"
        )
        quiet(app)
        await pilot.pause()

    assert snap_compare(app, terminal_size=(80, 24), run_before=run_before)
