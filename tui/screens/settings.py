"""The settings panel: this chat's system prompt and sampling settings, and the app's cache disk budget."""

from __future__ import annotations

from textual.binding import Binding
from textual.containers import Grid, Horizontal, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Select, TextArea

from ..commands import POLICIES, CommandError, parse_setting

FIELDS = [
    ("temperature", "Temperature"),
    ("top_p", "Top-p"),
    ("top_k", "Top-k (0 = off)"),
    ("min_p", "Min-p"),
    ("repetition_penalty", "Repetition penalty"),
    ("max_tokens", "Max reply tokens (empty = no limit)"),
    ("seed", "Seed (empty = random)"),
]


def _size(n: int) -> str:
    from qwen2_mlx.generation.cache_store import format_size

    return format_size(n)


class SettingsScreen(ModalScreen[tuple[str | None, dict] | None]):
    """Dismisses with (system prompt, settings) on save, None on cancel.

    Given a "cache_disk" setting (the app's, in bytes) it shows and returns that too.
    """

    BINDINGS = [Binding("escape", "cancel", "Cancel"), Binding("ctrl+s", "save", "Save", priority=True)]

    def __init__(self, system: str | None, settings: dict):
        super().__init__(classes="dialog-screen")
        self.system = system
        self.settings = dict(settings)

    def compose(self):
        with VerticalScroll(classes="dialog settings"):
            yield Label("Chat settings — Ctrl+S saves · Esc cancels", classes="dialog-question")
            yield Label("System prompt")
            yield TextArea(self.system or "", id="system", soft_wrap=True, compact=True)
            with Grid(id="settings-grid"):
                for key, label in FIELDS:
                    yield Label(label)
                    value = self.settings.get(key)
                    yield Input("" if value is None else str(value), id=f"set-{key}")
                yield Label("When the context is full")
                yield Select(
                    [(p, p) for p in POLICIES],
                    value=self.settings.get("context_policy") or "refuse",
                    allow_blank=False,
                    id="set-context_policy",
                )
                if "cache_disk" in self.settings:
                    yield Label("Disk for chat caches (all chats; 4GB, off)")
                    yield Input(_size(self.settings["cache_disk"]), id="set-cache_disk")
            yield Label("", id="settings-error")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Save", variant="primary", id="save")
                yield Button("Cancel", id="cancel")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "save":
            self.action_save()
        else:
            self.action_cancel()

    def action_cancel(self) -> None:
        self.dismiss(None)

    def action_save(self) -> None:
        settings = dict(self.settings)
        try:
            for key, _ in FIELDS:
                raw = self.query_one(f"#set-{key}", Input).value.strip()
                if not raw and key in ("max_tokens", "seed"):
                    settings[key] = None
                    continue
                settings[key] = parse_setting(key, raw)[1]
        except CommandError as e:
            self.query_one("#settings-error", Label).update(f"⚠ {e}")
            return
        settings["context_policy"] = self.query_one("#set-context_policy", Select).value
        if "cache_disk" in self.settings:
            try:
                settings["cache_disk"] = parse_setting("cache-disk", self.query_one("#set-cache_disk", Input).value)[1]
            except CommandError as e:
                self.query_one("#settings-error", Label).update(f"⚠ {e}")
                return
        system = self.query_one("#system", TextArea).text.strip() or None
        self.dismiss((system, settings))
