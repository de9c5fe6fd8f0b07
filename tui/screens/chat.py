"""The chat screen: one conversation, and the life of each reply in it.

A sent prompt is written to the store before the engine sees it, the reply streams into the
transcript and is saved every second, and Esc stops it; Ctrl+R regenerates, `e` edits an earlier
message and ← → walk between branches, all as new branches of the store's message tree, so
neither an error, a stop nor a crash loses what the user typed. Slash commands are looked up in
`tui.slash`. The app owns the model: it starts the engine when this screen is `Ready`, keeps
`loaded`, `context_limit` and `model_label`, and hands over the events of the reply being written
here (`job_event`).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from textual import on
from textual.app import ComposeResult
from textual.message import Message as TMessage
from textual.screen import Screen
from textual.widgets import Footer, Header, Static

from qwen2_mlx.generation.attachments import (
    Attachment,
    AttachmentError,
    paste_attachment,
    read_attachment,
    render_message,
)
from qwen2_mlx.generation.reading_time import ReadingSpeed
from qwen2_mlx.loading.paths import models_dir

from .. import commands, slash
from ..engine import CacheNote, Engine, Failed, Finished, Job, Prefill, PrefillRate, Stats, Token
from ..export import export_chat
from ..model_folders import list_models
from ..store import FINISHED, Message, Store
from ..widgets.attachments import AttachmentBar, chip, duration
from ..widgets.prompt import PromptInput
from ..widgets.status import StatusBar, bar
from ..widgets.transcript import MessageView, Transcript
from .chat_list import ChatListScreen
from .model_picker import ModelScreen
from .settings import SettingsScreen

SAVE_EVERY = 1.0  # seconds between saves of a streaming reply
TITLE_CHARS = 48
PREFILL_SHOWN = 512  # prompts at least this long (uncached tokens) show reading progress
EMPTY_HINT = (
    "Ask anything, in any language.\n\n"
    "Enter sends · Shift+Enter, Alt+Enter or Ctrl+J add a line · ↑ recalls earlier prompts\n"
    "Esc stops a reply · Ctrl+R regenerates · Shift+Tab moves to the messages (e edit, ← → branches, y copy)\n"
    "/help lists the slash commands · F1 the keys"
)
BUSY = "Still answering: press Esc to stop it first."


class ChatScreen(Screen):
    class Ready(TMessage):
        """The screen shows its chat and can show load progress: time to start the model."""

    def __init__(
        self,
        store: Store,
        engine: Engine,
        chat_id: Optional[int] = None,
        default_system: Optional[str] = None,
        default_settings: Optional[dict] = None,
        attachments: Optional[list[Attachment]] = None,
    ):
        super().__init__()
        self.store = store
        self.engine = engine
        self.default_system = default_system
        self.default_settings = dict(default_settings or {})
        self.chat_id: Optional[int] = chat_id
        self.system: Optional[str] = default_system
        self.settings: dict = dict(self.default_settings)
        self.job: Optional[Job] = None
        self.reply_id: Optional[int] = None
        self.reply_view: Optional[MessageView] = None
        self.reply_text = ""
        self.stopping = False
        self.edit_target: Optional[Message] = None
        self.last_stats: Optional[Stats] = None
        self._base_ctx: Optional[int] = 0  # None: not counted here (a server's model)
        self._last_save = 0.0
        self.pending: list[Attachment] = list(attachments or [])  # go with the next message sent
        self.prefill_rate: Optional[ReadingSpeed] = None  # this machine's reading speed, once measured
        self._measuring = False
        self._reading: Optional[tuple[float, int]] = None  # (time, tokens done) when this read began
        self._progress = (0, 0)  # (done, total) of the last read reported

    # layout
    def compose(self) -> ComposeResult:
        yield Header()
        yield Transcript(id="transcript")
        yield AttachmentBar(id="attachments")
        yield PromptInput(
            self.store.history(), id="prompt", placeholder="Message Qwen…  (Enter sends, Shift+Enter new line, /help)"
        )
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
        recovered = self.store.recover_interrupted()
        if recovered:
            self.notify(
                f"{recovered} reply(s) were cut off when the app last closed; they are kept and marked.",
                severity="warning",
            )
        if self.chat_id is not None and self.store.chat(self.chat_id) is None:
            self.notify(f"No chat {self.chat_id}; starting a new one.", severity="warning")
            self.chat_id = None
        await self.open_chat(self.chat_id)
        self.show_attachments()
        self.prompt.focus()
        self.status.set_loading(0.0, "starting")
        self.post_message(self.Ready())

    def save_unfinished(self) -> None:
        """Keep a reply that is still being written (the app is closing) as a stopped one."""
        if self.job is not None and self.reply_id is not None:
            self.store.update_message(self.reply_id, content=self.reply_text, status="stopped")

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
            self.app.title = "New chat"
        else:
            self.system = rec.system
            self.settings = {**self.default_settings, **rec.settings}
            self.app.title = rec.title or "Untitled"
        # The engine saves the previous chat's KV cache and loads this one's from disk meanwhile.
        replied = any(m.role == "assistant" and m.content for m in self.path())
        self.status.set_note("")
        self.engine.open_chat(self.store.cache_key(self.chat_id), replied, self.settings.get("kv_bits"))
        await self.render_transcript()
        if self.interrupted_read():
            self.notify(
                "Reading your last message was cut short. Ctrl+R continues from where it stopped "
                "(what was read is kept on disk).",
                severity="warning",
                timeout=10,
            )

    def interrupted_read(self) -> Optional[Message]:
        """The user message whose reply was stopped or cut off before a word of it came: its read can go on."""
        path = self.path()
        if len(path) >= 2 and path[-1].role == "assistant" and not path[-1].content:
            if path[-1].status in ("stopped", "interrupted") and path[-2].role == "user":
                return path[-2]
        return None

    def _ensure_chat(self, first_text: str) -> int:
        if self.chat_id is None:
            title = " ".join(first_text.split())
            title = title[:TITLE_CHARS] + ("…" if len(title) > TITLE_CHARS else "")
            rec = self.store.new_chat(title, self.system, self.settings, self.app.model_label)
            self.chat_id = rec.id
            self.app.title = rec.title
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
        shown = m.content
        if m.attachments:  # chips, not the files' thousands of lines
            shown = "   ".join(f"`{chip(a.summary())}`" for a in m.attachments) + "\n\n" + m.content
        return MessageView(m.role, shown, m.id, m.status, (k, len(sibs)), error=m.stats.get("error", ""))

    def update_context(self) -> None:
        if not self.app.loaded:
            return
        path = self.path()
        used = self.engine.count_tokens([m.as_dict() for m in path], self.system) if path else 0
        if used is None:  # a server's model: what its last reply's `usage` said, if the branch ends with one
            last = path[-1].stats.get("context_used") if path[-1].role == "assistant" else None
            used = last if isinstance(last, int) and last > 0 else None
        self.status.set_context(used, self.app.context_limit)
        self.show_attachments()

    # attachments
    async def attach(self, paths: list[str]) -> None:
        """Read files, folders or PDFs (off the UI thread) into chips for the next message."""
        for path in paths:
            try:
                att = await asyncio.to_thread(read_attachment, path)
            except AttachmentError as e:
                self.notify(str(e), severity="error", timeout=8)
                continue
            self.pending.append(att)
            skipped = ", ".join(f"{p} ({why})" for p, why in att.skipped[:3])
            self.notify(f"Attached {att.summary()}" + (f": skipped {skipped}" if skipped else ""), timeout=4)
        self.show_attachments()

    def add_attachment(self, att: Attachment) -> None:
        self.pending.append(att)
        self.show_attachments()

    def clear_attachments(self) -> None:
        self.pending = []
        self.show_attachments()

    def show_attachments(self) -> None:
        """The chips and, once the model is loaded, the tokens, share of the context and reading time."""
        bar = self.query_one("#attachments", AttachmentBar)
        chips = [chip(a.summary()) for a in self.pending]
        if not self.pending or not self.app.loaded:
            bar.show(chips, "the tokens are counted once the model is loaded" if chips else "")
            return
        if not self.engine.counts_tokens:
            files = sum(len(a.files) for a in self.pending)
            bar.show(
                chips,
                f"{files} file{'s' * (files != 1)} · the model is on a server: its tokens and reading time "
                "are not known here until it answers · /file clear removes them",
            )
            return
        msgs = [m.as_dict() for m in self.path()]
        before = self.engine.count_tokens(msgs, self.system) if msgs else 0
        with_files = msgs + [{"role": "user", "content": render_message(self.pending, "")}]
        after = self.engine.count_tokens(with_files, self.system)
        tokens, limit = after - before, self.app.context_limit or 1
        files = sum(len(a.files) for a in self.pending)
        preview = f"{files} file{'s' * (files != 1)} · {tokens:,} tokens · {after / limit:.0%} of the context"
        if after >= limit:
            preview += " ⚠ more than the context window holds"
        if self.prefill_rate is None:
            preview += " · measuring this machine's reading speed…"
            if not self._measuring:
                self._measuring = True
                self.engine.measure_prefill()
        else:
            speed = self.prefill_rate  # reading starts at `before`: the chat's cache holds what came before
            rate = speed.tokens_per_s(before, after)
            preview += f" · ~{duration(speed.seconds(before, after))} to read at {rate:,.0f} tokens/s ({speed.source})"
        bar.show(chips, preview + " · /file clear removes them")

    async def new_chat(self) -> None:
        if self.job is not None:
            self.notify(BUSY, severity="warning")
            return
        await self.open_chat(None)
        self.prompt.focus()

    def open_chat_list(self) -> None:
        async def chosen(chat_id: Optional[int]) -> None:
            if chat_id is None:
                self.prompt.focus()
                return
            if self.job is not None:
                self.notify(BUSY, severity="warning")
                return
            await self.open_chat(None if chat_id == -1 else chat_id)
            self.prompt.focus()

        self.app.push_screen(ChatListScreen(self.store, self.chat_id), chosen)

    def open_settings(self) -> None:
        def saved(result) -> None:
            if result is None:
                return
            settings = dict(result[1])
            budget = settings.pop("cache_disk", None)
            if budget is not None and budget != self.app.cache_disk:
                self.app.set_cache_disk(budget)
            self.system, self.settings = result[0], {**self.settings, **settings}
            self.save_chat_settings()
            self.update_context()
            self.notify("Settings saved for this chat.", timeout=2)

        shown = {**self.settings, "cache_disk": self.app.cache_disk}
        self.app.push_screen(SettingsScreen(self.system, shown), saved)

    # what slash commands do here (slash.ChatActions)
    def rename_chat(self, title: str) -> None:
        if self.chat_id is None:
            self.notify("Send a message first: an empty chat is not saved.", severity="warning")
            return
        self.store.update_chat(self.chat_id, title=title)
        self.app.title = title

    def copy_last_reply(self, code: bool) -> None:
        replies = [m for m in self.path() if m.role == "assistant"]
        if not replies:
            self.notify("No reply to copy yet.", severity="warning")
            return
        views = [v for v in self.transcript.views if v.message_id == replies[-1].id]
        if code and views:
            views[0].action_copy_code()
        else:
            self.app.copy_text(replies[-1].content, "reply")

    def choose_model(self, name: str) -> None:
        """Load model `name`; without one, say which is loaded and offer the converted ones."""
        app = self.app
        if name:
            app.switch_model(name)
            return
        info = f"Model: {app.model_label} · context {app.context_limit:,} tokens" + (
            f", loaded in {app.load_seconds:.1f}s" if app.loaded else " (loading)"
        )
        if app.backend_factory is None:
            self.notify(info)
            return

        def chosen(path: Optional[str]) -> None:
            if path:
                app.switch_model(path)

        app.push_screen(ModelScreen(list_models(), app.model_label, str(models_dir())), chosen)

    def set_cache_disk(self, budget: int) -> None:
        self.app.set_cache_disk(budget)

    def local_only(self, key: str) -> Optional[str]:
        """Why setting `key` does nothing with this backend (a server's model), or None."""
        why = getattr(self.engine.backend, "local_only", None)
        return why(key) if why is not None else None

    def show_help(self) -> None:
        self.app.action_help()

    def quit_app(self) -> None:
        self.app.exit()

    def save_chat_settings(self) -> None:
        if self.chat_id is not None:
            self.store.update_chat(self.chat_id, system=self.system, settings=self.settings)

    def export(self, fmt: str, target: str = "") -> Optional[Path]:
        msgs = [m.as_dict() for m in self.path() if m.content or m.role == "user"]
        if not msgs:
            self.notify("Nothing to export yet.", severity="warning")
            return None
        try:
            path = export_chat(self.app.title, self.system, msgs, fmt, path=Path(target) if target else None)
        except (OSError, ValueError) as e:
            self.notify(f"Export failed: {e}", severity="error")
            return None
        self.notify(f"Exported to {path}")
        return path

    @on(PromptInput.LongPaste)
    def on_long_paste(self, event: PromptInput.LongPaste) -> None:
        self.add_attachment(paste_attachment(event.text))

    # sending
    @on(PromptInput.Submitted)
    async def on_prompt_submitted(self, event: PromptInput.Submitted) -> None:
        text = event.text
        try:
            cmd = commands.parse(text)
            command = slash.find(cmd.name) if cmd is not None else None
        except commands.CommandError as e:
            self.notify(str(e), severity="error")
            return
        if cmd is not None:
            self.prompt.remember(text)
            self.store.add_history(text)
            self.prompt.set_text("")
            await command.handler(self, cmd)
            return
        if self.job is not None:
            self.notify("Still answering: press Esc to stop it first. Your text is kept.", severity="warning")
            return
        await self.send(commands.unescape(text), raw=text)

    async def send(self, text: str, raw: Optional[str] = None) -> None:
        chat_id = self._ensure_chat(text)
        editing = self.edit_target
        parent = editing.parent_id if editing is not None else self.store.chat(chat_id).leaf_id
        attached = (editing.attachments if editing is not None else []) + self.pending  # an edit keeps its files
        user = self.store.add_message(chat_id, parent, "user", text, attachments=attached)  # before generation
        self.store.add_history(raw or text)
        self.prompt.remember(raw or text)
        self.prompt.set_text("")
        self._set_editing(None)
        self.clear_attachments()
        await self.start_reply(user, rerender=editing is not None)

    async def start_reply(self, user: Message, rerender: bool = False) -> None:
        # Failed and empty replies stay on screen and in the file, but the model never saw them.
        history = [
            m.as_dict()
            for m in self.store.path(self.chat_id, user.id)
            if not (m.role == "assistant" and (m.status == "error" or not m.content))
        ]
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
        loaded = self.app.loaded
        self.reply_view = self.transcript.views[-1]
        self.reply_view.set_status("streaming" if loaded else "waiting")
        self.reply_view.start_stream()
        self._base_ctx = self.engine.count_tokens(history, self.system)
        self._reading, self._progress = None, (0, 0)
        self.status.set_note("")
        self.status.set_stats(None)  # the figures shown from now on are this reply's
        self.job = self.engine.submit(history, self.system, self.settings, chat_key=self.store.cache_key(self.chat_id))
        if loaded:  # while loading, the bar stays; the reply starts when the model is ready
            self.status.set_state("answering… (Esc stops)")

    # the reply being written
    def model_ready(self) -> None:
        """The model (first, or after /model) is loaded: a waiting reply starts, the meter shows."""
        self.status.set_state("ready" if self.job is None else "answering… (Esc stops)")
        if self.reply_view is not None and self.reply_view.status == "waiting":
            self.reply_view.set_status("streaming")
        self.update_context()

    async def job_event(self, ev: object) -> None:
        """An engine event (Prefill, Token, Finished, Failed) of the reply being written; or a CacheNote."""
        if isinstance(ev, CacheNote):
            self.status.set_note(ev.text, ev.warning)
            return
        if isinstance(ev, PrefillRate):
            self._measuring = False
            self.prefill_rate = ev.speed
            self.show_attachments()
            return
        if self.job is None or getattr(ev, "job", None) != self.job.id:
            return
        view = self.reply_view
        if isinstance(ev, Prefill):
            self.show_reading(ev)
        elif isinstance(ev, Token):
            self.reply_text += ev.text
            if view is not None and view.is_attached:
                await view.write(ev.text)
            if self.app.loaded:
                if self._base_ctx is not None:
                    self.status.set_context(self._base_ctx + ev.stats.generation_tokens, self.app.context_limit)
                self.status.set_stats(ev.stats)
            if time.monotonic() - self._last_save >= SAVE_EVERY:
                self.store.update_message(self.reply_id, content=self.reply_text)
                self._last_save = time.monotonic()
        elif isinstance(ev, Finished):
            status = FINISHED.get(ev.reason, "done")
            self.reply_text = ev.text
            self.store.update_message(
                self.reply_id, content=ev.text, status=status, stats={**asdict(ev.stats), "finish_reason": ev.reason}
            )
            try:
                if view is not None and view.is_attached:
                    await view.finish(ev.text, status)
            finally:
                self._end_job()
            self.last_stats = ev.stats
            self.status.set_stats(ev.stats)
            self.status.set_state(
                {"stopped": "stopped", "length": "cut at max tokens", "context": "context full"}.get(status, "ready")
            )
            self.update_context()
            if status in ("length", "context"):
                self.notify(view.note_text() if view is not None else status, severity="warning")
            done, total = self._progress
            if status == "stopped" and not ev.text and 0 < done < total:
                self.notify(
                    f"Reading stopped with at least {done:,} of {total:,} tokens read (the step under way when you "
                    "stopped is kept too). Ctrl+R continues from there, now or after a restart.",
                    timeout=10,
                )
        elif isinstance(ev, Failed):
            status = "context" if ev.context else "error"
            self.store.update_message(self.reply_id, content=self.reply_text, status=status, stats={"error": ev.error})
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
                self.notify(
                    f"The model failed: {ev.error}. Your message is saved; Ctrl+R retries.", severity="error", timeout=8
                )

    def show_reading(self, ev: Prefill) -> None:
        """A long read in the status bar: done/total, tokens/s and the time left; the measured speed,
        scaled by what this read really took, becomes the next attachment's estimate."""
        now = time.monotonic()
        self._progress = (ev.done, ev.total)
        if self._reading is None:
            self._reading = (now, ev.done)
        if self.stopping:
            return
        if ev.done >= ev.total:
            self.status.set_state("answering… (Esc stops)")
            return
        if ev.total < PREFILL_SHOWN:
            return
        t0, d0 = self._reading
        figures = f"{bar(ev.done / ev.total)} {ev.done:,}/{ev.total:,} tokens"
        if now > t0 and ev.done > d0:
            figures += f" · {(ev.done - d0) / (now - t0):,.0f} t/s · {duration(self._time_left(ev, now - t0))} left"
        self.status.set_state(f"reading the prompt {figures}  (Esc stops, what was read is kept)")

    def _time_left(self, ev: Prefill, elapsed: float) -> float:
        """The rest of the read at the measured speed, scaled by how far off it was for the part read so
        far: later tokens attend to more keys, so a flat rate would promise too little."""
        _, d0 = self._reading
        speed = self.prefill_rate or ReadingSpeed(elapsed / (ev.done - d0))  # not measured yet: a flat rate
        predicted = speed.seconds(d0, ev.done)
        if predicted > 0:
            speed = speed.scaled(elapsed / predicted, f"measured on the last read of {ev.done - d0:,} tokens")
        if ev.done - d0 >= PREFILL_SHOWN:
            self.prefill_rate = speed  # the next attachment's estimate
        return speed.seconds(ev.done, ev.total)

    def _end_job(self) -> None:
        self.job = None
        self.stopping = False
        self.reply_view = None
        self.reply_id = None

    def stop(self) -> None:
        """Esc: stop the reply; else cancel an edit; else go back to the prompt."""
        if self.job is not None:
            self.stopping = True
            self.engine.cancel(self.job)
            if self.reply_view is not None:
                self.reply_view.set_status("stopping")
            self.status.set_state("stopping…")
        elif self.edit_target is not None:
            self._set_editing(None)
            self.prompt.set_text("")
        elif self.app.focused is not self.prompt:
            self.prompt.focus()

    # redo: regenerate, edit, branches
    async def regenerate(self) -> None:
        if self.job is not None:
            self.notify(BUSY, severity="warning")
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
            self.notify(BUSY, severity="warning")
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
