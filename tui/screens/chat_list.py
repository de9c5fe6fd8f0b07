"""The chat list: reopen (Enter), rename (r), delete (d) or start (n) a chat."""

from __future__ import annotations

import time

from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label, OptionList
from textual.widgets.option_list import Option

from .dialogs import AskScreen, ConfirmScreen


class ChatListScreen(ModalScreen[int | None]):
    """Dismisses with the id of the chat to open, -1 for a new chat, or None."""

    BINDINGS = [
        Binding("escape", "close", "Close"),
        Binding("r", "rename", "Rename", id="chats.rename"),
        Binding("d,delete", "delete", "Delete", id="chats.delete"),
        Binding("n", "new", "New chat", id="chats.new"),
    ]

    def __init__(self, store, current: int | None):
        super().__init__(classes="dialog-screen")
        self.store = store
        self.current = current

    def compose(self):
        with Vertical(classes="dialog chats"):
            yield Label("Chats — Enter opens · r renames · d deletes · n new · Esc closes", classes="dialog-question")
            yield OptionList(id="chat-options")

    def on_mount(self) -> None:
        self._fill()
        self.query_one(OptionList).focus()

    def _fill(self, highlight: int | None = None) -> None:
        options = self.query_one(OptionList)
        options.clear_options()
        chats = self.store.chats()
        for rec in chats:
            n = len(self.store.path(rec.id))
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(rec.updated))
            mark = "● " if rec.id == self.current else "  "
            options.add_option(Option(f"{mark}{rec.title or 'Untitled'}  ·  {n} messages  ·  {when}", id=str(rec.id)))
        if not chats:
            options.add_option(Option("No chats yet", id="none", disabled=True))
        ids = [r.id for r in chats]
        target = highlight if highlight in ids else self.current
        if target in ids:
            options.highlighted = ids.index(target)

    def _selected(self) -> int | None:
        options = self.query_one(OptionList)
        if options.highlighted is None:
            return None
        opt = options.get_option_at_index(options.highlighted)
        return int(opt.id) if opt.id and opt.id.isdigit() else None

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        if event.option.id and event.option.id.isdigit():
            self.dismiss(int(event.option.id))

    def action_close(self) -> None:
        self.dismiss(None)

    def action_new(self) -> None:
        self.dismiss(-1)

    def action_rename(self) -> None:
        chat_id = self._selected()
        if chat_id is None:
            return
        rec = self.store.chat(chat_id)

        def done(title: str | None) -> None:
            if title is not None and title.strip():
                self.store.update_chat(chat_id, title=title.strip())
                if chat_id == self.current:
                    self.app.sub_title = title.strip()
                self._fill(chat_id)

        self.app.push_screen(AskScreen("New title:", rec.title), done)

    def action_delete(self) -> None:
        chat_id = self._selected()
        if chat_id is None:
            return
        rec = self.store.chat(chat_id)

        def done(yes: bool | None) -> None:
            if yes:
                self.store.delete_chat(chat_id)
                self.app.chat_deleted(chat_id, was_open=chat_id == self.current)
                if chat_id == self.current:
                    self.current = None
                self._fill()

        self.app.push_screen(
            ConfirmScreen(f"Delete “{rec.title or 'Untitled'}” and all its messages?", yes="Delete", no="Keep"), done
        )
