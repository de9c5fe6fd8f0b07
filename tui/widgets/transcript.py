"""The conversation: one MessageView per message in a scroll view that follows the stream.

Replies stream into a Textual `Markdown` through `MarkdownStream` (appends are batched and parsed
incrementally, never a full re-render per token). The scroll view is anchored to the bottom and
lets go as soon as the user scrolls up.
"""

from __future__ import annotations

from typing import Optional

from markdown_it import MarkdownIt
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.message import Message as TMessage
from textual.widgets import Label, Markdown, Static
from textual.widgets._markdown import MarkdownFence

STATUS_NOTES = {
    "stopped": ("stopped", "⏹ stopped"),
    "length": ("cut", "✂ cut at the reply limit (max tokens) — /max N to raise it"),
    "context": ("cut", "✂ cut: the context window is full — /clear or /set context drop_oldest"),
    "error": ("error", "⚠ error"),
    "interrupted": ("error", "⚠ interrupted (the app closed mid-reply)"),
    "streaming": ("", "▍ generating… (Esc stops)"),
    "stopping": ("stopped", "⏹ stopping…"),
    "waiting": ("", "waiting for the model…"),
}


def code_blocks(markdown: str) -> list[str]:
    """The fenced and indented code blocks of a Markdown text, in order."""
    tokens = MarkdownIt("commonmark").parse(markdown)
    return [t.content for t in tokens if t.type in ("fence", "code_block")]


class MessageView(Vertical, can_focus=True):
    """One message: a header (who, branch k/n), the body, and a note (stopped, cut, error)."""

    BINDINGS = [
        Binding("y", "copy", "Copy", id="message.copy"),
        Binding("c", "copy_code", "Copy code", id="message.copy_code"),
        Binding("e", "edit", "Edit", id="message.edit"),
        Binding("r", "regenerate", "Regenerate", id="message.regenerate"),
        Binding("left,h", "branch(-1)", "◀ Branch", id="message.branch_previous"),
        Binding("right,l", "branch(1)", "Branch ▶", id="message.branch_next"),
        Binding("up,k", "move(-1)", "Previous message", show=False, id="message.previous"),
        Binding("down,j", "move(1)", "Next message", show=False, id="message.next"),
    ]

    class Action(TMessage):
        """Asks the app to do something with a message (edit, regenerate, switch branch)."""

        def __init__(self, view: MessageView, action: str, arg: int = 0):
            super().__init__()
            self.view = view
            self.action = action
            self.arg = arg

    def __init__(
        self,
        role: str,
        content: str,
        message_id: Optional[int] = None,
        status: str = "done",
        branch: tuple[int, int] = (1, 1),
        error: str = "",
        **kwargs,
    ):
        classes = f"message {role}"
        super().__init__(classes=classes, **kwargs)
        self.role = role
        self.content = content
        self.message_id = message_id
        self.status = status
        self.branch = branch
        self.error = error
        self.stream = None
        self._code_index = 0

    def compose(self):
        yield Label(self._header_text(), classes="message-header")
        if self.role == "assistant":
            yield Markdown(self.content, classes="message-body")
        else:
            yield Static(self.content, classes="message-body", markup=False)
        yield Label(self.note_text(), classes="message-note")

    def on_mount(self) -> None:
        self._refresh_note()

    def _header_text(self) -> str:
        who = {"user": "You", "assistant": "Qwen", "system": "System"}.get(self.role, self.role)
        k, n = self.branch
        return f"{who}  ‹ {k}/{n} ›" if n > 1 else who

    def note_text(self) -> str:
        kind, text = STATUS_NOTES.get(self.status, ("", ""))
        if self.status == "error" and self.error:
            text = f"⚠ error: {self.error} — Ctrl+R retries"
        return text

    def _refresh_note(self) -> None:
        note = self.query_one(".message-note", Label)
        note.update(self.note_text())
        note.display = bool(self.note_text())
        for kind in ("stopped", "cut", "error"):
            note.set_class(STATUS_NOTES.get(self.status, ("", ""))[0] == kind, f"-{kind}")

    def set_status(self, status: str, error: str = "") -> None:
        self.status = status
        self.error = error
        self._refresh_note()

    @property
    def body(self):
        return self.query_one(".message-body")

    def start_stream(self) -> None:
        self.stream = Markdown.get_stream(self.body)

    async def write(self, text: str) -> None:
        self.content += text
        if self.stream is None:
            self.start_stream()
        await self.stream.write(text)

    async def finish(self, text: str, status: str, error: str = "") -> None:
        """End the stream; one final full render fixes any code fence state left by streaming."""
        if self.stream is not None:
            await self.stream.stop()
            self.stream = None
        if text != self.content or "```" in text or "~~~" in text:
            self.content = text
            await self.body.update(text)
        self.set_status(status, error)

    def action_copy(self) -> None:
        self.app.copy_text(self.content, "message")

    def action_copy_code(self) -> None:
        blocks = code_blocks(self.content)
        if not blocks:
            self.app.notify("This message has no code block.", severity="warning")
            return
        i = self._code_index % len(blocks)
        self._code_index += 1
        label = "code block" if len(blocks) == 1 else f"code block {i + 1}/{len(blocks)}"
        self.app.copy_text(blocks[i], label)

    def action_edit(self) -> None:
        self.post_message(self.Action(self, "edit"))

    def action_regenerate(self) -> None:
        self.post_message(self.Action(self, "regenerate"))

    def action_branch(self, step: int) -> None:
        self.post_message(self.Action(self, "branch", step))

    def action_move(self, step: int) -> None:
        """Up/Down walk the messages; Down past the last one returns to the prompt."""
        views = list(self.parent.query(MessageView)) if self.parent is not None else []
        k = views.index(self) + step if self in views else -1
        if 0 <= k < len(views):
            views[k].focus()
            views[k].scroll_visible(animate=False)
        elif step > 0:
            self.app.query_one("#prompt").focus()

    def on_click(self, event) -> None:
        # A click on a code block copies it, as in oterm.
        widget = event.widget
        while widget is not None and widget is not self:
            if isinstance(widget, MarkdownFence):
                self.app.copy_text(widget.code, "code block")
                return
            widget = widget.parent


class Transcript(VerticalScroll):
    """The scrolling list of messages."""

    def on_mount(self) -> None:
        self.anchor()

    @property
    def views(self) -> list[MessageView]:
        return list(self.query(MessageView))
