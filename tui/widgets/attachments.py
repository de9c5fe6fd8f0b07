"""The files waiting to go with the next message: one chip each, and what reading them will cost."""

from __future__ import annotations

from textual.widgets import Static


def duration(seconds: float) -> str:
    """'45s', '3m05s', '1h12m'."""
    s = max(int(round(seconds)), 0)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def chip(summary: str) -> str:
    return f"📎 {summary}"


class AttachmentBar(Static):
    """Hidden while nothing is attached. `show(chips, preview)`: the chips' line and the preview line."""

    def show(self, chips: list[str], preview: str = "") -> None:
        self.display = bool(chips)
        text = "   ".join(chips)
        self.update(f"{text}\n{preview}" if preview else text)
