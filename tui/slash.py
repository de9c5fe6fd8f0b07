"""What the slash commands do: one table from command name to its handler and help text.

`commands.parse` reads what was typed into a `Command`; `find` looks its name up in `COMMANDS`,
and the chat screen awaits the handler with itself and the Command. `/help` and F1 list the
commands from this same table, in its order.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from qwen2_mlx.loading.paths import models_dir

from .commands import Command, CommandError
from .models import list_models
from .widgets.model_picker import ModelScreen

if TYPE_CHECKING:
    from .screens.chat import ChatScreen


@dataclass(frozen=True)
class SlashCommand:
    usage: str  # how /help shows it
    help: str
    handler: Callable[[ChatScreen, Command], Awaitable[None]]


async def show_help(chat: ChatScreen, cmd: Command) -> None:
    chat.app.action_help()


async def quit_app(chat: ChatScreen, cmd: Command) -> None:
    chat.app.exit()


async def system_prompt(chat: ChatScreen, cmd: Command) -> None:
    if not cmd.arg:
        chat.notify(f"System prompt: {chat.system!r}" if chat.system else "No system prompt set.")
        return
    chat.system = None if cmd.arg.lower() in ("off", "none", "clear") else cmd.arg
    chat.save_chat_settings()
    chat.notify("System prompt removed." if chat.system is None else "System prompt set for this chat.")
    chat.update_context()


async def set_setting(chat: ChatScreen, cmd: Command) -> None:
    if cmd.key == "cache_disk":  # an app setting, not this chat's
        chat.app.set_cache_disk(cmd.value)
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


async def regenerate(chat: ChatScreen, cmd: Command) -> None:
    await chat.regenerate()


async def clear(chat: ChatScreen, cmd: Command) -> None:
    system, settings = chat.system, dict(chat.settings)
    await chat.open_chat(None)
    chat.system, chat.settings = system, settings
    chat.notify("New chat (the previous one is in the chat list, Ctrl+L).")


async def new_chat(chat: ChatScreen, cmd: Command) -> None:
    await chat.new_chat()


async def chat_list(chat: ChatScreen, cmd: Command) -> None:
    chat.open_chat_list()


async def rename(chat: ChatScreen, cmd: Command) -> None:
    if chat.chat_id is None:
        chat.notify("Send a message first: an empty chat is not saved.", severity="warning")
        return
    chat.store.update_chat(chat.chat_id, title=cmd.arg)
    chat.app.title = cmd.arg


async def export(chat: ChatScreen, cmd: Command) -> None:
    chat.export(cmd.value, cmd.arg)


async def copy(chat: ChatScreen, cmd: Command) -> None:
    replies = [m for m in chat.path() if m.role == "assistant"]
    if not replies:
        chat.notify("No reply to copy yet.", severity="warning")
        return
    views = [v for v in chat.transcript.views if v.message_id == replies[-1].id]
    if cmd.arg == "code" and views:
        views[0].action_copy_code()
    else:
        chat.app.copy_text(replies[-1].content, "reply")


async def attach(chat: ChatScreen, cmd: Command) -> None:
    if cmd.value == "clear":
        chat.clear_attachments()
        chat.notify("Attachments removed.", timeout=2)
        return
    await chat.attach(cmd.value)


async def settings(chat: ChatScreen, cmd: Command) -> None:
    chat.open_settings()


async def model(chat: ChatScreen, cmd: Command) -> None:
    app = chat.app
    if cmd.arg:
        app.switch_model(cmd.arg)
        return
    info = f"Model: {app.model_label} · context {app.context_limit:,} tokens" + (
        f", loaded in {app.load_seconds:.1f}s" if app.loaded else " (loading)"
    )
    if app.backend_factory is None:
        chat.notify(info)
        return

    def chosen(path: Optional[str]) -> None:
        if path:
            app.switch_model(path)

    app.push_screen(ModelScreen(list_models(), app.model_label, str(models_dir())), chosen)


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
