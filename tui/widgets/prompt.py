"""The prompt editor: a TextArea where Enter sends and Shift+Enter / Alt+Enter / Ctrl+J add a line.

Up on the first line walks back through earlier prompts (Down walks forward to the draft), and
Ctrl+G opens the text in $VISUAL / $EDITOR. Every binding has an id, so a keymap can move it.
A paste of more than `LONG_PASTE_LINES` lines or `LONG_PASTE_CHARS` characters is not inserted: it
is posted as `LongPaste`, and the chat keeps it as an attachment chip.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import tempfile
from pathlib import Path

from textual import events
from textual.app import SuspendNotSupported
from textual.binding import Binding
from textual.message import Message
from textual.widgets import TextArea

LONG_PASTE_LINES = 40
LONG_PASTE_CHARS = 4000


class PromptInput(TextArea):
    BINDINGS = [
        Binding("enter", "submit", "Send", id="prompt.submit"),
        Binding("shift+enter,alt+enter,ctrl+j", "newline", "New line", show=False, id="prompt.newline"),
        Binding("ctrl+g", "external_editor", "Editor", show=False, id="prompt.editor"),
    ]
    # These run from the widget's own key handler, in order with the typed characters: as app-level
    # (priority) bindings, an Enter that arrives in the same read as the text would run before the
    # text is inserted and send an empty prompt.
    OWN_ACTIONS = ("submit", "newline", "external_editor")

    class Submitted(Message):
        def __init__(self, prompt: PromptInput, text: str):
            super().__init__()
            self.prompt = prompt
            self.text = text

    class LongPaste(Message):
        def __init__(self, text: str):
            super().__init__()
            self.text = text

    def __init__(self, history: list[str] | None = None, **kwargs):
        kwargs.setdefault("soft_wrap", True)
        kwargs.setdefault("show_line_numbers", False)
        kwargs.setdefault("tab_behavior", "focus")
        kwargs.setdefault("compact", True)
        super().__init__(**kwargs)
        self.prompt_history: list[str] = list(history or [])
        self.history_index = len(self.prompt_history)
        self._draft = ""

    def _own_action(self, key: str) -> str | None:
        bindings = self._bindings.copy()
        keymap = getattr(self.app, "_keymap", None)
        if keymap:
            bindings.apply_keymap(keymap)
        for binding in bindings.key_to_bindings.get(key, []):
            if binding.action in self.OWN_ACTIONS:
                return binding.action
        return None

    async def _on_key(self, event) -> None:
        action = self._own_action(event.key)
        if action is not None:
            event.stop()
            event.prevent_default()
            getattr(self, f"action_{action}")()
            return
        await super()._on_key(event)

    async def _on_paste(self, event: events.Paste) -> None:
        # Textual runs TextArea's own handler after this one (it walks the classes), unless prevented.
        text = event.text
        if text.count("\n") >= LONG_PASTE_LINES or len(text) > LONG_PASTE_CHARS:
            event.stop()
            event.prevent_default()
            self.post_message(self.LongPaste(text))

    def remember(self, text: str) -> None:
        if text.strip() and (not self.prompt_history or self.prompt_history[-1] != text):
            self.prompt_history.append(text)
        self.history_index = len(self.prompt_history)
        self._draft = ""

    def set_text(self, text: str) -> None:
        """Replace the text and put the cursor at its end."""
        self.text = text
        self.move_cursor(self.document.end)

    def action_submit(self) -> None:
        if self.text.strip():
            self.post_message(self.Submitted(self, self.text))

    def action_newline(self) -> None:
        start, end = self.selection
        self.replace("\n", start, end, maintain_selection_offset=False)

    def _visual_row(self) -> int:
        return self.wrapped_document.location_to_offset(self.cursor_location).y

    def action_cursor_up(self, select: bool = False) -> None:
        if not select and self.selection.is_empty and self._visual_row() == 0 and self.history_index > 0:
            if self.history_index == len(self.prompt_history):
                self._draft = self.text
            self.history_index -= 1
            self._show_history()
            return
        super().action_cursor_up(select)

    def action_cursor_down(self, select: bool = False) -> None:
        last_row = self.wrapped_document.height - 1
        if (
            not select
            and self.selection.is_empty
            and self._visual_row() >= last_row
            and self.history_index < len(self.prompt_history)
        ):
            self.history_index += 1
            self._show_history()
            return
        super().action_cursor_down(select)

    def _show_history(self) -> None:
        text = (
            self._draft if self.history_index == len(self.prompt_history) else self.prompt_history[self.history_index]
        )
        self.text = text
        # End of the first line: another Up goes further back, editing starts where typing would.
        first = text.split("\n", 1)[0]
        self.move_cursor((0, len(first)))

    def action_external_editor(self) -> None:
        editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi"
        fd, name = tempfile.mkstemp(suffix=".md", prefix="qwen2-prompt-")
        path = Path(name)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(self.text)
            try:
                with self.app.suspend():
                    subprocess.run(shlex.split(editor) + [str(path)], check=False)
            except SuspendNotSupported:
                self.app.notify("This terminal cannot hand over to an editor here.", severity="warning")
                return
            except OSError as e:
                self.app.notify(f"Cannot start the editor {editor!r}: {e}", severity="error")
                return
            text = path.read_text(encoding="utf-8")
            self.set_text(text[:-1] if text.endswith("\n") else text)
        finally:
            path.unlink(missing_ok=True)
