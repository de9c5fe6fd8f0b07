"""The Textual chat app: the process-wide parts around the chat screen.

The app owns what outlives one chat: the store (SQLite), the model (the engine thread, and which
model is loaded with how much context), the key bindings with the user's keymap and theme, the
clipboard, and the help. The conversation itself, with the life of each reply, is the
`ChatScreen` (screens/chat.py); slash commands are the table in slash.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

from textual.app import App
from textual.binding import Binding
from textual.message import Message as TMessage
from textual.screen import Screen

from qwen2_mlx.loading.paths import data_dir

from . import cjk_wrap, slash
from .backend import DEFAULT_CACHE_DISK, DEFAULT_SETTINGS
from .engine import Engine, Loaded, LoadFailed, Loading
from .model_folders import check_model
from .model_folders import resolve as resolve_model
from .screens.chat import ChatScreen
from .screens.chat_list import ChatListScreen
from .screens.dialogs import ConfirmScreen, HelpScreen
from .store import Store
from .widgets.prompt import PromptInput
from .widgets.status import StatusBar
from .widgets.transcript import MessageView, Transcript


class EngineEvent(TMessage):
    """An event from the generation thread, delivered on the UI's loop."""

    def __init__(self, event: object):
        super().__init__()
        self.event = event


def keymap_path() -> Path:
    return data_dir() / "keymap.json"


def ui_state_path() -> Path:
    """Remembered app-wide settings: the theme picked in the command palette, the cache disk budget."""
    return data_dir() / "ui.json"


def read_ui_state() -> dict:
    try:
        state = json.loads(ui_state_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def write_ui_state(**changes) -> None:
    try:
        path = ui_state_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**read_ui_state(), **changes}), encoding="utf-8")
    except OSError:  # a read-only data folder only costs the remembered settings
        pass


class ChatApp(App):
    CSS_PATH = "app.tcss"
    TITLE = "qwen2-chat"
    ENABLE_COMMAND_PALETTE = True
    BINDINGS = [
        Binding("escape", "stop", "Stop", id="app.stop"),
        Binding("ctrl+c", "interrupt", "Stop/Quit", priority=True, id="app.interrupt", show=False),
        Binding("ctrl+q", "quit", "Quit", priority=True, id="app.quit", show=False),
        Binding("ctrl+r", "regenerate", "Regen", id="app.regenerate"),
        Binding("ctrl+l", "chats", "Chats", id="app.chats"),
        Binding("ctrl+n", "new_chat", "New", id="app.new_chat", show=False),
        Binding("ctrl+s", "settings", "Settings", id="app.settings"),
        Binding("f1", "help", "Help", id="app.help"),
    ]

    def __init__(
        self,
        backend,
        store: Optional[Store] = None,
        chat_id: Optional[int] = None,
        default_system: Optional[str] = None,
        default_settings: Optional[dict] = None,
        model_label: str = "",
        animate: bool = True,
        backend_factory=None,
        attachments: Optional[list] = None,
    ):
        super().__init__()
        cjk_wrap.install()
        self.backend = backend
        self.store = store or Store()
        self.engine = Engine(backend, lambda ev: self.post_message(EngineEvent(ev)))
        self.backend_factory = backend_factory  # path -> backend, for /model; None: no switching
        self.model_label = model_label or getattr(backend, "name", "")
        self.loaded = False
        self.context_limit = 0
        self.load_seconds = 0.0
        budget = read_ui_state().get("cache_disk")
        self.cache_disk = budget if isinstance(budget, int) and budget >= 0 else DEFAULT_CACHE_DISK
        if getattr(backend, "cache_budget", 0) is None:  # the backend keeps chat caches on disk
            backend.cache_budget = self.cache_disk
        self.chat = ChatScreen(
            self.store,
            self.engine,
            chat_id,
            default_system,
            {**DEFAULT_SETTINGS, **(default_settings or {})},
            attachments=attachments,  # --file: chips waiting for the first message
        )
        if not animate:
            self.animation_level = "none"

    def get_default_screen(self) -> Screen:
        return self.chat

    @property
    def prompt(self) -> PromptInput:
        return self.chat.prompt

    @property
    def transcript(self) -> Transcript:
        return self.chat.transcript

    @property
    def status(self) -> StatusBar:
        return self.chat.status

    def on_mount(self) -> None:
        self.sub_title = self.model_label
        self._load_keymap()
        self._load_theme()

    def on_chat_screen_ready(self, message: ChatScreen.Ready) -> None:
        self.engine.start()  # now the chat screen is there to show the load

    def _load_keymap(self) -> None:
        path = keymap_path()
        if not path.exists():
            return
        try:
            keymap = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(keymap, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in keymap.items()
            ):
                raise ValueError("expected a JSON object from binding id to keys")
        except (OSError, ValueError) as e:
            self.notify(f"{path}: ignored ({e})", severity="warning")
            return
        self.set_keymap(keymap)

    def _load_theme(self) -> None:
        theme = read_ui_state().get("theme")
        if isinstance(theme, str) and theme in self.available_themes:
            self.theme = theme
        self._theme_loaded = True

    def watch_theme(self, theme: str) -> None:
        if not getattr(self, "_theme_loaded", False):
            return
        write_ui_state(theme=theme)

    def set_cache_disk(self, nbytes: int) -> None:
        """The disk budget of the chat caches (all chats): remembered, applied at once (evicting)."""
        self.cache_disk = nbytes
        write_ui_state(cache_disk=nbytes)
        self.engine.set_cache_budget(nbytes)
        from qwen2_mlx.generation.cache_store import format_size

        shown = format_size(nbytes)
        self.notify(f"cache-disk = {shown}" + (" (chat caches on disk are off)" if not nbytes else " for all chats"))

    async def on_unmount(self) -> None:
        self.chat.save_unfinished()
        self.engine.shutdown()

    # the model
    def on_engine_event(self, message: EngineEvent) -> None:
        ev = message.event
        if isinstance(ev, Loading):
            self.status.set_loading(ev.fraction, ev.text)
        elif isinstance(ev, Loaded):
            if ev.name != self.model_label and self.model_label:
                self.notify(f"Now using {ev.name}.", timeout=3)
            self.model_label = ev.name
            self.sub_title = ev.name
            self.loaded = True
            self.context_limit = ev.context_limit
            self.load_seconds = ev.seconds
            self.chat.model_ready()
        elif isinstance(ev, LoadFailed) and not ev.initial:
            self.loaded = True  # the previous model is still loaded and answers
            self.status.set_state("ready")
            self.notify(
                f"Cannot load that model: {ev.error}. Still using {self.model_label}.", severity="error", timeout=8
            )
        elif isinstance(ev, LoadFailed):
            self.exit(
                return_code=2,
                message=f"qwen2-chat: cannot load the model: {ev.error}\n"
                + getattr(self.backend, "load_hint", "hint: run `python convert.py` to create the default model"),
            )
        else:  # a reply's event: in turn with the chat screen's own messages
            self.chat.call_later(self.chat.job_event, ev)

    def switch_model(self, target: str) -> None:
        """Load another converted model in place of this one (the chats stay as they are)."""
        if self.backend_factory is None:
            why = getattr(self.engine.backend, "local_only", lambda _: None)("model")
            self.notify(
                why or "This app was started without a model loader; restart with --model PATH.", severity="warning"
            )
            return
        if self.chat.job is not None or not self.loaded:
            self.notify("Wait for the reply (or the load) to finish first.", severity="warning")
            return
        path = resolve_model(target)
        problem = check_model(path)
        if problem:
            self.notify(problem, severity="error", timeout=8)
            return
        self.loaded = False
        self.status.set_loading(0.0, str(path))
        backend = self.backend_factory(path)
        if getattr(backend, "cache_budget", 0) is None:
            backend.cache_budget = self.cache_disk
        self.engine.switch(backend)

    # keys: what concerns the chat runs on the chat screen's message queue, in turn with its replies
    def action_stop(self) -> None:
        self.chat.call_later(self.chat.stop)

    def action_regenerate(self) -> None:
        self.chat.call_later(self.chat.regenerate)

    def action_chats(self) -> None:
        self.chat.call_later(self.chat.open_chat_list)

    def action_new_chat(self) -> None:
        self.chat.call_later(self.chat.new_chat)

    def action_settings(self) -> None:
        self.chat.call_later(self.chat.open_settings)

    def chat_deleted(self, chat_id: Optional[int] = None, was_open: bool = True) -> None:
        """Called by the chat list when a chat was deleted: its cache on disk goes too."""
        key = self.store.cache_key(chat_id)
        if key is not None:
            self.engine.forget_chat(key)
        if was_open:
            self.chat.call_later(self.chat.open_chat, None)

    def action_interrupt(self) -> None:
        if isinstance(self.screen, (ConfirmScreen,)):
            self.screen.dismiss(True)
            return
        if self.focused is self.prompt and not self.prompt.selection.is_empty:
            self.copy_text(self.prompt.selected_text, "selection")
            return
        selected = self.screen.get_selected_text()  # text selected with the mouse in the transcript
        if selected:
            self.copy_text(selected, "selection")
            self.screen.clear_selection()
            return
        if self.chat.job is not None:
            self.action_stop()
            return
        if self.screen is not self.chat:
            self.screen.dismiss(None)
            return

        def answer(yes: Optional[bool]) -> None:
            if yes:
                self.exit()

        self.push_screen(ConfirmScreen("Quit qwen2-chat?  (Ctrl+C again or y quits)", yes="Quit", no="Stay"), answer)

    def action_help(self) -> None:
        rows = []
        for cls in (ChatApp, PromptInput, MessageView, ChatListScreen):
            for b in cls.BINDINGS:
                if isinstance(b, Binding) and b.id:
                    keys = self._keymap.get(b.id, b.key)
                    rows.append((b.id, keys, b.description))
        self.push_screen(HelpScreen(str(keymap_path()), rows, slash.help_rows()))

    # clipboard
    def copy_text(self, text: str, what: str = "text") -> bool:
        """OSC 52 through the terminal, plus pbcopy on macOS (Terminal.app ignores OSC 52)."""
        ok = True
        try:
            self.copy_to_clipboard(text)
        except Exception:
            ok = False
        if sys.platform == "darwin" and shutil.which("pbcopy"):
            try:
                subprocess.run(["pbcopy"], input=text.encode("utf-8"), check=True, timeout=5)
                ok = True
            except (OSError, subprocess.SubprocessError):
                pass
        if ok:
            self.notify(f"Copied {what} ({len(text)} characters).", timeout=2)
        else:
            self.notify("Could not reach the clipboard.", severity="warning")
        return ok
