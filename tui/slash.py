"""What the slash commands do: one table from command name to its handler and help text.

`commands.parse` reads what was typed into a `Command`; `find` looks its name up in `COMMANDS`,
and the chat screen awaits the handler with itself and the Command. `/help` and F1 list the
commands from this same table, in its order. Handlers see the screen only through `ChatActions`,
the few things a command may do, so this module imports no screen (no import circle).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Optional, Protocol

from .commands import Command, CommandError


class ChatActions(Protocol):
    """What slash commands may read and do on the chat screen (`screens.chat.ChatScreen`)."""

    system: Optional[str]
    settings: dict

    def notify(self, message: str, *, severity: str = ..., timeout: Optional[float] = ...) -> Any: ...
    def save_chat_settings(self) -> None: ...
    def update_context(self) -> None: ...
    async def regenerate(self) -> None: ...
    async def open_chat(self, chat_id: Optional[int]) -> None: ...
    async def new_chat(self) -> None: ...
    def open_chat_list(self) -> None: ...
    def open_settings(self) -> None: ...
    def export(self, fmt: str, target: str = "") -> Any: ...
    def rename_chat(self, title: str) -> None: ...
    def copy_last_reply(self, code: bool) -> None: ...
    def choose_model(self, name: str) -> None: ...
    def set_cache_disk(self, budget: int) -> None: ...
    def local_only(self, key: str) -> Optional[str]: ...
    def show_help(self) -> None: ...
    def quit_app(self) -> None: ...
    async def attach(self, paths: list[str]) -> None: ...
    def clear_attachments(self) -> None: ...


@dataclass(frozen=True)
class SlashCommand:
    usage: str  # how /help shows it
    help: str
    handler: Callable[[ChatActions, Command], Awaitable[None]]


async def show_help(chat: ChatActions, cmd: Command) -> None:
    chat.show_help()


async def quit_app(chat: ChatActions, cmd: Command) -> None:
    chat.quit_app()


async def system_prompt(chat: ChatActions, cmd: Command) -> None:
    if not cmd.arg:
        chat.notify(f"System prompt: {chat.system!r}" if chat.system else "No system prompt set.")
        return
    chat.system = None if cmd.arg.lower() in ("off", "none", "clear") else cmd.arg
    chat.save_chat_settings()
    chat.notify("System prompt removed." if chat.system is None else "System prompt set for this chat.")
    chat.update_context()


async def set_setting(chat: ChatActions, cmd: Command) -> None:
    why = chat.local_only(cmd.key)
    if why:  # the model is on a server: a chat's setting is kept for later, and does nothing there
        if cmd.key != "cache_disk":
            chat.settings[cmd.key] = cmd.value
            chat.save_chat_settings()
        chat.notify(f"{cmd.key} does nothing here: {why}", severity="warning")
        return
    if cmd.key == "cache_disk":  # an app setting, not this chat's
        chat.set_cache_disk(cmd.value)
        return
    changed = chat.settings.get(cmd.key) != cmd.value
    chat.settings[cmd.key] = cmd.value
    chat.save_chat_settings()
    if cmd.key == "kv_bits":
        shown = f"{cmd.value}-bit" if cmd.value else "off (float)"
        rebuilt = " · this chat's KV cache is rebuilt at the next reply" if changed else ""
        chat.notify(f"KV cache quantization {shown}{rebuilt}")
        return
    chat.notify(f"{cmd.key} = {cmd.value}")


async def regenerate(chat: ChatActions, cmd: Command) -> None:
    await chat.regenerate()


async def clear(chat: ChatActions, cmd: Command) -> None:
    system, settings = chat.system, dict(chat.settings)
    await chat.open_chat(None)
    chat.system, chat.settings = system, settings
    chat.notify("New chat (the previous one is in the chat list, Ctrl+L).")


async def new_chat(chat: ChatActions, cmd: Command) -> None:
    await chat.new_chat()


async def chat_list(chat: ChatActions, cmd: Command) -> None:
    chat.open_chat_list()


async def rename(chat: ChatActions, cmd: Command) -> None:
    chat.rename_chat(cmd.arg)


async def export(chat: ChatActions, cmd: Command) -> None:
    chat.export(cmd.value, cmd.arg)


async def copy(chat: ChatActions, cmd: Command) -> None:
    chat.copy_last_reply(code=cmd.arg == "code")


async def attach(chat: ChatActions, cmd: Command) -> None:
    if cmd.value == "clear":
        chat.clear_attachments()
        chat.notify("Attachments removed.", timeout=2)
        return
    await chat.attach(cmd.value)


async def settings(chat: ChatActions, cmd: Command) -> None:
    chat.open_settings()


async def model(chat: ChatActions, cmd: Command) -> None:
    chat.choose_model(cmd.arg)


COMMANDS: dict[str, SlashCommand] = {
    "system": SlashCommand(
        "/system [text]", "show or set this chat's system prompt (/system off removes it)", system_prompt
    ),
    "set": SlashCommand(
        "/set KEY VALUE",
        "temp, top_p, top_k, min_p, rep (repetition penalty), seed, max, context, lookup on|off, "
        "kv-bits 4|8|off (quantized KV cache, this chat); "
        "cache-disk SIZE|off: disk kept for chat caches, all chats (default 4GB)",
        set_setting,
    ),
    # parse() reads `/max N` as `/set max N`; this entry is its line in /help.
    "max": SlashCommand(
        "/max N", "longest reply in tokens (/max none: until done or the context is full)", set_setting
    ),
    "regen": SlashCommand("/regen", "regenerate the last reply (keeps the old one as a branch)", regenerate),
    "clear": SlashCommand(
        "/clear", "start a new, empty chat with the same settings (the old one stays in the list)", clear
    ),
    "new": SlashCommand("/new", "start a new chat with default settings", new_chat),
    "chats": SlashCommand("/chats", "open the chat list (reopen, rename, delete)", chat_list),
    "rename": SlashCommand("/rename TITLE", "rename this chat", rename),
    "export": SlashCommand(
        "/export [md|jsonl] [PATH]", "write this chat to a file (default: Markdown in the current folder)", export
    ),
    "file": SlashCommand(
        "/file PATH…",
        "attach files, folders (their text files, .gitignore respected) or PDFs to the next message; "
        "/file clear removes them",
        attach,
    ),
    "copy": SlashCommand("/copy [code]", "copy the last reply (or its code blocks) to the clipboard", copy),
    "settings": SlashCommand("/settings", "open the settings panel (system prompt and sampling)", settings),
    "model": SlashCommand(
        "/model [NAME|PATH]", "pick a converted model from a list, or load this one (the chats stay)", model
    ),
    "help": SlashCommand("/help", "this list, with the keys", show_help),
    "quit": SlashCommand("/quit", "leave the app", quit_app),
}
ALIASES = {"exit": "quit"}


def find(name: str) -> SlashCommand:
    """The table entry for a command name, or a CommandError that says what to do instead."""
    entry = COMMANDS.get(ALIASES.get(name, name))
    if entry is None:
        raise CommandError(f"unknown command /{name}: type /help for the list (start with // to send a '/')")
    return entry


def help_rows() -> list[tuple[str, str]]:
    """(usage, what it does) for each command, as /help and F1 show them."""
    return [(c.usage, c.help) for c in COMMANDS.values()]
