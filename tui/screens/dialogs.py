"""Small modal screens: yes/no confirmation, a one-line text question, and the help page."""

from __future__ import annotations

from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Markdown

KEYS = [
    ("Enter", "send"),
    ("Shift+Enter · Alt+Enter · Ctrl+J", "new line"),
    ("Up / Down (first / last line)", "earlier / later prompts"),
    ("Ctrl+G", "edit the prompt in $EDITOR"),
    ("Esc · Ctrl+C (while answering)", "stop the reply"),
    ("Ctrl+R", "regenerate the last reply"),
    ("Shift+Tab / Tab", "move between messages and the prompt"),
    ("on a message: ↑ ↓", "previous / next message (↓ after the last returns to the prompt)"),
    ("on a message: y · c", "copy the message · copy its code blocks (click a block copies it too)"),
    ("on a message: e · r · ← →", "edit and resend · regenerate · switch between alternative replies"),
    ("Ctrl+L", "chat list"),
    ("Ctrl+N", "new chat"),
    ("Ctrl+S", "settings (system prompt, sampling)"),
    ("Ctrl+Q", "quit (Ctrl+C when idle asks first)"),
    ("Ctrl+P", "command palette (themes, keys)"),
]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def help_markdown(
    keymap_path: str, bindings: list[tuple[str, str, str]] = (), commands: list[tuple[str, str]] = ()
) -> str:
    """The help page: keys, slash commands as (usage, what it does), and the rebindable binding ids."""
    rows = ["| Key | Does |", "|---|---|"] + [f"| {k} | {v} |" for k, v in KEYS]
    # A bare `|` ends a table cell even inside a code span (`/export [md|jsonl]`): escape it.
    cmds = ["| Command | Does |", "|---|---|"] + [f"| `{_cell(c)}` | {_cell(d)} |" for c, d in commands]
    ids = ["| Binding id | Keys | Does |", "|---|---|---|"] + [f"| `{i}` | {k} | {d} |" for i, k, d in bindings]
    return "\n".join(
        [
            "# Keys",
            "",
            *rows,
            "",
            "# Slash commands",
            "",
            *cmds,
            "",
            "Start a message with `//` to send a leading `/`.",
            "",
            "# Changing keys",
            "",
            f"Put a JSON object from binding id to keys in `{keymap_path}`, "
            'e.g. `{"prompt.submit": "ctrl+j", "prompt.newline": "enter,shift+enter"}`, and restart.',
            "",
            *ids,
        ]
    )


class ConfirmScreen(ModalScreen[bool]):
    BINDINGS = [
        Binding("y", "answer(True)", "Yes"),
        Binding("n,escape", "answer(False)", "No"),
        Binding("ctrl+c", "answer(True)", "Yes", show=False),
    ]

    def __init__(self, question: str, yes: str = "Yes", no: str = "No"):
        super().__init__(classes="dialog-screen")
        self.question, self.yes, self.no = question, yes, no

    def compose(self):
        with Vertical(classes="dialog"):
            yield Label(self.question, classes="dialog-question")
            with Horizontal(classes="dialog-buttons"):
                yield Button(self.yes, variant="error", id="yes")
                yield Button(self.no, variant="primary", id="no")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, value: bool) -> None:
        self.dismiss(value)


class AskScreen(ModalScreen[str | None]):
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, question: str, value: str = ""):
        super().__init__(classes="dialog-screen")
        self.question, self.value = question, value

    def compose(self):
        with Vertical(classes="dialog"):
            yield Label(self.question, classes="dialog-question")
            yield Input(self.value, id="answer")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value)

    def action_cancel(self) -> None:
        self.dismiss(None)


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,f1", "dismiss", "Close")]

    def __init__(
        self, keymap_path: str, bindings: list[tuple[str, str, str]] = (), commands: list[tuple[str, str]] = ()
    ):
        super().__init__(classes="dialog-screen")
        self.keymap_path = keymap_path
        self.bindings = list(bindings)
        self.commands = list(commands)

    def compose(self):
        with VerticalScroll(classes="dialog help"):
            yield Markdown(help_markdown(self.keymap_path, self.bindings, self.commands))

    def action_dismiss(self) -> None:
        self.dismiss(None)
