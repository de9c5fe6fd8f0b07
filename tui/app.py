"""The Textual chat app: transcript, prompt, status bar; keys, slash commands and chat storage.

The store (SQLite) owns the conversation tree; the engine thread owns the model. A sent prompt is
written to the store before the engine sees it, and a streaming reply is saved every second, so
neither an error, a stop nor a crash loses what the user typed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from textual import on
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.message import Message as TMessage
from textual.widgets import Footer, Header, Static

from qwen2_mlx.loading.paths import data_dir, models_dir

from . import cjk_wrap, commands
from .backend import DEFAULT_SETTINGS
from .engine import Engine, Failed, Finished, Job, Loaded, LoadFailed, Loading, Prefill, Stats, Token
from .export import export_chat
from .models import check_model, list_models
from .models import resolve as resolve_model
from .store import FINISHED, Message, Store
from .widgets.chat_list import ChatListScreen
from .widgets.dialogs import ConfirmScreen, HelpScreen
from .widgets.model_picker import ModelScreen
from .widgets.prompt import PromptInput
from .widgets.settings import SettingsScreen
from .widgets.status import StatusBar, bar
from .widgets.transcript import MessageView, Transcript

SAVE_EVERY = 1.0  # seconds between saves of a streaming reply
TITLE_CHARS = 48
PREFILL_SHOWN = 512  # prompts at least this long (uncached tokens) show reading progress
EMPTY_HINT = ("Ask anything, in any language.\n\n"
              "Enter sends · Shift+Enter, Alt+Enter or Ctrl+J add a line · ↑ recalls earlier prompts\n"
              "Esc stops a reply · Ctrl+R regenerates · Tab moves to the messages (e edit, ← → branches, y copy)\n"
              "/help lists the slash commands · F1 the keys")


class EngineEvent(TMessage):
    """An event from the generation thread, delivered on the UI's loop."""

    def __init__(self, event: object):
        super().__init__()
        self.event = event


def keymap_path() -> Path:
    return data_dir() / "keymap.json"


def ui_state_path() -> Path:
    """Remembered look (the theme picked in the command palette)."""
    return data_dir() / "ui.json"


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

    def __init__(self, backend, store: Optional[Store] = None, chat_id: Optional[int] = None,
                 default_system: Optional[str] = None, default_settings: Optional[dict] = None,
                 model_label: str = "", animate: bool = True, backend_factory=None):
        super().__init__()
        cjk_wrap.install()
        self.backend = backend
        self.store = store or Store()
        self.engine = Engine(backend, lambda ev: self.post_message(EngineEvent(ev)))
        self.default_system = default_system
        self.backend_factory = backend_factory  # path -> backend, for /model; None: no switching
        self.default_settings = {**DEFAULT_SETTINGS, **(default_settings or {})}
        self.model_label = model_label or getattr(backend, "name", "")
        self.chat_id: Optional[int] = chat_id
        self.system: Optional[str] = default_system
        self.settings: dict = dict(self.default_settings)
        self.job: Optional[Job] = None
        self.reply_id: Optional[int] = None
        self.reply_view: Optional[MessageView] = None
        self.reply_text = ""
        self.stopping = False
        self.edit_target: Optional[Message] = None
        self.loaded = False
        self.context_limit = 0
        self.last_stats: Optional[Stats] = None
        self.load_seconds = 0.0
        self._base_ctx = 0
        self._last_save = 0.0
        if not animate:
            self.animation_level = "none"

    # layout
    def compose(self) -> ComposeResult:
        yield Header()
        yield Transcript(id="transcript")
        yield PromptInput(self.store.history(), id="prompt", placeholder="Message Qwen…  (Enter sends, Shift+Enter new line, /help)")
        yield StatusBar(id="status")
        yield Footer()

    @property
    def prompt(self) -> PromptInput:
        return self.query_one("#prompt", PromptInput)

    @property
    def transcript(self) -> Transcript:
        return self.query_one("#transcript", Transcript)

    @property
    def status(self) -> StatusBar:
        return self.query_one("#status", StatusBar)

    async def on_mount(self) -> None:
        self.sub_title = self.model_label
        self._load_keymap()
        self._load_theme()
        recovered = self.store.recover_interrupted()
        if recovered:
            self.notify(f"{recovered} reply(s) were cut off when the app last closed; they are kept and marked.",
                        severity="warning")
        if self.chat_id is not None and self.store.chat(self.chat_id) is None:
            self.notify(f"No chat {self.chat_id}; starting a new one.", severity="warning")
            self.chat_id = None
        await self.open_chat(self.chat_id)
        self.prompt.focus()
        self.status.set_loading(0.0, "starting")
        self.engine.start()

    def _load_keymap(self) -> None:
        path = keymap_path()
        if not path.exists():
            return
        try:
            keymap = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(keymap, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                       for k, v in keymap.items()):
                raise ValueError("expected a JSON object from binding id to keys")
        except (OSError, ValueError) as e:
            self.notify(f"{path}: ignored ({e})", severity="warning")
            return
        self.set_keymap(keymap)

    def _load_theme(self) -> None:
        try:
            theme = json.loads(ui_state_path().read_text(encoding="utf-8")).get("theme")
        except (OSError, ValueError, AttributeError):
            theme = None
        if isinstance(theme, str) and theme in self.available_themes:
            self.theme = theme
        self._theme_loaded = True

    def watch_theme(self, theme: str) -> None:
        if not getattr(self, "_theme_loaded", False):
            return
        try:
            path = ui_state_path()
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"theme": theme}), encoding="utf-8")
        except OSError:  # a read-only data folder only costs the remembered theme
            pass

    async def on_unmount(self) -> None:
        if self.job is not None and self.reply_id is not None:
            self.store.update_message(self.reply_id, content=self.reply_text, status="stopped")
        self.engine.shutdown()

    # chats
    async def open_chat(self, chat_id: Optional[int]) -> None:
        """Show a stored chat (None: a fresh, unsaved one that is created on the first message)."""
        self.chat_id = chat_id
        self.edit_target = None
        rec = self.store.chat(chat_id) if chat_id is not None else None
        if rec is None:
            self.chat_id = None
            self.system = self.default_system
            self.settings = dict(self.default_settings)
            self.title = "New chat"
        else:
            self.system = rec.system
            self.settings = {**self.default_settings, **rec.settings}
            self.title = rec.title or "Untitled"
        await self.render_transcript()

    def chat_deleted(self) -> None:
        """Called by the chat list when the open chat was deleted."""
        self.call_later(self.open_chat, None)

    def _ensure_chat(self, first_text: str) -> int:
        if self.chat_id is None:
            title = " ".join(first_text.split())
            title = title[:TITLE_CHARS] + ("…" if len(title) > TITLE_CHARS else "")
            rec = self.store.new_chat(title, self.system, self.settings, self.model_label)
            self.chat_id = rec.id
            self.title = rec.title
        return self.chat_id

    def path(self) -> list[Message]:
        return self.store.path(self.chat_id) if self.chat_id is not None else []

    async def render_transcript(self, focus_id: Optional[int] = None) -> None:
        transcript = self.transcript
        await transcript.remove_children()
        views = [self._view_for(m) for m in self.path()]
        if views:
            await transcript.mount_all(views)
        else:
            await transcript.mount(Static(EMPTY_HINT, classes="empty-hint"))
        transcript.anchor()
        self.update_context()
        if focus_id is not None:
            for v in views:
                if v.message_id == focus_id:
                    v.focus()
                    v.scroll_visible(animate=False)

    def _view_for(self, m: Message) -> MessageView:
        sibs = self.store.siblings(m)
        k = next((i for i, s in enumerate(sibs) if s.id == m.id), 0) + 1
        return MessageView(m.role, m.content, m.id, m.status, (k, len(sibs)), error=m.stats.get("error", ""))

    def update_context(self) -> None:
        if not self.loaded:
            return
        msgs = [m.as_dict() for m in self.path()]
        used = self.engine.count_tokens(msgs, self.system) if msgs else 0
        self.status.set_context(used, self.context_limit)

    # sending
    @on(PromptInput.Submitted)
    async def on_prompt_submitted(self, event: PromptInput.Submitted) -> None:
        text = event.text
        try:
            cmd = commands.parse(text)
        except commands.CommandError as e:
            self.notify(str(e), severity="error")
            return
        if cmd is not None:
            self.prompt.remember(text)
            self.store.add_history(text)
            self.prompt.set_text("")
            await self.run_command(cmd)
            return
        if self.job is not None:
            self.notify("Still answering: press Esc to stop it first. Your text is kept.", severity="warning")
            return
        await self.send(commands.unescape(text), raw=text)

    async def send(self, text: str, raw: Optional[str] = None) -> None:
        chat_id = self._ensure_chat(text)
        editing = self.edit_target
        parent = editing.parent_id if editing is not None else self.store.chat(chat_id).leaf_id
        user = self.store.add_message(chat_id, parent, "user", text)  # saved before generation starts
        self.store.add_history(raw or text)
        self.prompt.remember(raw or text)
        self.prompt.set_text("")
        self._set_editing(None)
        await self.start_reply(user, rerender=editing is not None)

    async def start_reply(self, user: Message, rerender: bool = False) -> None:
        # Failed and empty replies stay on screen and in the file, but the model never saw them.
        history = [m.as_dict() for m in self.store.path(self.chat_id, user.id)
                   if not (m.role == "assistant" and (m.status == "error" or not m.content))]
        reply = self.store.add_message(self.chat_id, user.id, "assistant", "", status="streaming")
        self.reply_id, self.reply_text, self.stopping = reply.id, "", False
        self._last_save = time.monotonic()
        if rerender:
            await self.render_transcript()
        else:
            await self.transcript.query(".empty-hint").remove()
            views = [v for v in self.transcript.views if v.message_id == user.id]
            if not views:
                await self.transcript.mount(self._view_for(user))
            await self.transcript.mount(self._view_for(reply))
            self.transcript.anchor()
        self.reply_view = self.transcript.views[-1]
        self.reply_view.set_status("streaming" if self.loaded else "waiting")
        self.reply_view.start_stream()
        self._base_ctx = self.engine.count_tokens(history, self.system)
        self.job = self.engine.submit(history, self.system, self.settings)
        if self.loaded:  # while loading, the bar stays; the reply starts when the model is ready
            self.status.set_state("answering… (Esc stops)")

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
            self.status.set_state("ready"
                                  if self.job is None else "answering… (Esc stops)")
            if self.reply_view is not None and self.reply_view.status == "waiting":
                self.reply_view.set_status("streaming")
            self.update_context()
        elif isinstance(ev, LoadFailed) and not ev.initial:
            self.loaded = True  # the previous model is still loaded and answers
            self.status.set_state("ready")
            self.notify(f"Cannot load that model: {ev.error}. Still using {self.model_label}.",
                        severity="error", timeout=8)
        elif isinstance(ev, LoadFailed):
            self.exit(return_code=2, message=f"qwen2-chat: cannot load the model: {ev.error}\n"
                                             "hint: run `python convert.py` to create the default model")
        elif self.job is not None and getattr(ev, "job", None) == self.job.id:
            self.call_next(self._job_event, ev)

    async def _job_event(self, ev: object) -> None:
        if self.job is None or getattr(ev, "job", None) != self.job.id:
            return
        view = self.reply_view
        if isinstance(ev, Prefill):
            if ev.total >= PREFILL_SHOWN and ev.done < ev.total and not self.stopping:
                self.status.set_state(f"reading the prompt {bar(ev.done / ev.total)} "
                                      f"{ev.done:,}/{ev.total:,} tokens  (Esc stops)")
            elif ev.done >= ev.total and not self.stopping:
                self.status.set_state("answering… (Esc stops)")
        elif isinstance(ev, Token):
            self.reply_text += ev.text
            if view is not None and view.is_attached:
                await view.write(ev.text)
            if self.loaded:
                self.status.set_context(self._base_ctx + ev.stats.generation_tokens, self.context_limit)
            if time.monotonic() - self._last_save >= SAVE_EVERY:
                self.store.update_message(self.reply_id, content=self.reply_text)
                self._last_save = time.monotonic()
        elif isinstance(ev, Finished):
            status = FINISHED.get(ev.reason, "done")
            self.reply_text = ev.text
            self.store.update_message(self.reply_id, content=ev.text, status=status,
                                      stats={**asdict(ev.stats), "finish_reason": ev.reason})
            try:
                if view is not None and view.is_attached:
                    await view.finish(ev.text, status)
            finally:
                self._end_job()
            self.last_stats = ev.stats
            self.status.set_stats(ev.stats)
            self.status.set_state({"stopped": "stopped", "length": "cut at max tokens",
                                   "context": "context full"}.get(status, "ready"))
            self.update_context()
            if status in ("length", "context"):
                self.notify(view.note_text() if view is not None else status, severity="warning")
        elif isinstance(ev, Failed):
            status = "context" if ev.context else "error"
            self.store.update_message(self.reply_id, content=self.reply_text, status=status,
                                      stats={"error": ev.error})
            try:
                if view is not None and view.is_attached:
                    await view.finish(self.reply_text, status, ev.error)
            finally:
                self._end_job()
            if ev.context:
                self.status.set_state("context full")
                self.notify(f"{ev.error}. Your message is saved.", severity="warning", timeout=10)
            else:
                self.status.set_state("error · Ctrl+R retries")
                self.notify(f"The model failed: {ev.error}. Your message is saved; Ctrl+R retries.",
                            severity="error", timeout=8)

    def _end_job(self) -> None:
        self.job = None
        self.stopping = False
        self.reply_view = None
        self.reply_id = None

    # stopping and quitting
    def action_stop(self) -> None:
        if self.job is not None:
            self.stopping = True
            self.engine.cancel(self.job)
            if self.reply_view is not None:
                self.reply_view.set_status("stopping")
            self.status.set_state("stopping…")
        elif self.edit_target is not None:
            self._set_editing(None)
            self.prompt.set_text("")
        elif self.focused is not self.prompt:
            self.prompt.focus()

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
        if self.job is not None:
            self.action_stop()
            return
        if self.screen is not self.screen_stack[0]:
            self.screen.dismiss(None)
            return

        def answer(yes: Optional[bool]) -> None:
            if yes:
                self.exit()

        self.push_screen(ConfirmScreen("Quit qwen2-chat?  (Ctrl+C again or y quits)", yes="Quit", no="Stay"), answer)

    # redo: regenerate, edit, branches
    async def action_regenerate(self) -> None:
        if self.job is not None:
            self.notify("Still answering: press Esc to stop it first.", severity="warning")
            return
        path = self.path()
        while path and path[-1].role != "user":
            path.pop()
        if not path:
            self.notify("Nothing to regenerate yet.", severity="warning")
            return
        await self.start_reply(path[-1], rerender=True)

    @on(MessageView.Action)
    async def on_message_action(self, event: MessageView.Action) -> None:
        view = event.view
        m = self.store.message(view.message_id) if view.message_id is not None else None
        if m is None:
            return
        if self.job is not None:
            self.notify("Still answering: press Esc to stop it first.", severity="warning")
            return
        if event.action == "edit":
            if m.role != "user":
                self.notify("Only your own messages can be edited; r regenerates a reply.", severity="warning")
                return
            self._set_editing(m)
            self.prompt.set_text(m.content)
            self.prompt.focus()
        elif event.action == "regenerate":
            user = self.store.message(m.parent_id) if m.role == "assistant" else m
            if user is None:
                return
            await self.start_reply(user, rerender=True)
        elif event.action == "branch":
            sibs = self.store.siblings(m)
            k = next(i for i, s in enumerate(sibs) if s.id == m.id) + event.arg
            if not 0 <= k < len(sibs):
                self.notify(f"No more alternatives ({len(sibs)} in all).", severity="information", timeout=2)
                return
            leaf = self.store.deepest(sibs[k])
            self.store.update_chat(self.chat_id, leaf_id=leaf.id)
            await self.render_transcript(focus_id=sibs[k].id)

    def _set_editing(self, m: Optional[Message]) -> None:
        self.edit_target = m
        prompt = self.prompt
        prompt.border_title = "Editing an earlier message: Enter resends as a new branch · Esc cancels" if m else None
        prompt.set_class(m is not None, "-editing")

    # commands
    async def run_command(self, cmd: commands.Command) -> None:
        name = cmd.name
        if name == "help":
            self.action_help()
        elif name == "quit":
            self.exit()
        elif name == "system":
            if not cmd.arg:
                self.notify(f"System prompt: {self.system!r}" if self.system else "No system prompt set.")
                return
            self.system = None if cmd.arg.lower() in ("off", "none", "clear") else cmd.arg
            self._save_chat_settings()
            self.notify("System prompt removed." if self.system is None else "System prompt set for this chat.")
            self.update_context()
        elif name == "set":
            self.settings[cmd.key] = cmd.value
            self._save_chat_settings()
            self.notify(f"{cmd.key} = {cmd.value}")
        elif name == "regen":
            await self.action_regenerate()
        elif name == "clear":
            system, settings = self.system, dict(self.settings)
            await self.open_chat(None)
            self.system, self.settings = system, settings
            self.notify("New chat (the previous one is in the chat list, Ctrl+L).")
        elif name == "new":
            await self.action_new_chat()
        elif name == "chats":
            self.action_chats()
        elif name == "rename":
            if self.chat_id is None:
                self.notify("Send a message first: an empty chat is not saved.", severity="warning")
                return
            self.store.update_chat(self.chat_id, title=cmd.arg)
            self.title = cmd.arg
        elif name == "export":
            self.export(cmd.value, cmd.arg)
        elif name == "copy":
            replies = [m for m in self.path() if m.role == "assistant"]
            if not replies:
                self.notify("No reply to copy yet.", severity="warning")
                return
            views = [v for v in self.transcript.views if v.message_id == replies[-1].id]
            if cmd.arg == "code" and views:
                views[0].action_copy_code()
            else:
                self.copy_text(replies[-1].content, "reply")
        elif name == "settings":
            self.action_settings()
        elif name == "model":
            if cmd.arg:
                self.switch_model(cmd.arg)
                return
            info = (f"Model: {self.model_label} · context {self.context_limit:,} tokens"
                    + (f", loaded in {self.load_seconds:.1f}s" if self.loaded else " (loading)"))
            if self.backend_factory is None:
                self.notify(info)
                return

            def chosen(path: Optional[str]) -> None:
                if path:
                    self.switch_model(path)

            self.push_screen(ModelScreen(list_models(), self.model_label, str(models_dir())), chosen)

    def switch_model(self, target: str) -> None:
        """Load another converted model in place of this one (the chats stay as they are)."""
        if self.backend_factory is None:
            self.notify("This app was started without a model loader; restart with --model PATH.",
                        severity="warning")
            return
        if self.job is not None or not self.loaded:
            self.notify("Wait for the reply (or the load) to finish first.", severity="warning")
            return
        path = resolve_model(target)
        problem = check_model(path)
        if problem:
            self.notify(problem, severity="error", timeout=8)
            return
        self.loaded = False
        self.status.set_loading(0.0, str(path))
        self.engine.switch(self.backend_factory(path))

    def _save_chat_settings(self) -> None:
        if self.chat_id is not None:
            self.store.update_chat(self.chat_id, system=self.system, settings=self.settings)

    def export(self, fmt: str, target: str = "") -> Optional[Path]:
        msgs = [m.as_dict() for m in self.path() if m.content or m.role == "user"]
        if not msgs:
            self.notify("Nothing to export yet.", severity="warning")
            return None
        try:
            path = export_chat(self.title, self.system, msgs, fmt, path=Path(target) if target else None)
        except (OSError, ValueError) as e:
            self.notify(f"Export failed: {e}", severity="error")
            return None
        self.notify(f"Exported to {path}")
        return path

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

    # screens
    def action_help(self) -> None:
        rows = []
        for cls in (ChatApp, PromptInput, MessageView, ChatListScreen):
            for b in cls.BINDINGS:
                if isinstance(b, Binding) and b.id:
                    keys = self._keymap.get(b.id, b.key)
                    rows.append((b.id, keys, b.description))
        self.push_screen(HelpScreen(str(keymap_path()), rows))

    def action_chats(self) -> None:
        async def chosen(chat_id: Optional[int]) -> None:
            if chat_id is None:
                self.prompt.focus()
                return
            if self.job is not None:
                self.notify("Still answering: press Esc to stop it first.", severity="warning")
                return
            await self.open_chat(None if chat_id == -1 else chat_id)
            self.prompt.focus()

        self.push_screen(ChatListScreen(self.store, self.chat_id), chosen)

    async def action_new_chat(self) -> None:
        if self.job is not None:
            self.notify("Still answering: press Esc to stop it first.", severity="warning")
            return
        await self.open_chat(None)
        self.prompt.focus()

    def action_settings(self) -> None:
        def saved(result) -> None:
            if result is None:
                return
            self.system, self.settings = result[0], {**self.settings, **result[1]}
            self._save_chat_settings()
            self.update_context()
            self.notify("Settings saved for this chat.", timeout=2)

        self.push_screen(SettingsScreen(self.system, self.settings), saved)
