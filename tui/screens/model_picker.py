"""The model picker: converted models in the models folder, with kind, precision and size."""

from __future__ import annotations

from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label, OptionList
from textual.widgets.option_list import Option

from ..model_folders import ModelInfo


class ModelScreen(ModalScreen[str | None]):
    """Dismisses with the chosen model folder, or None."""

    BINDINGS = [Binding("escape", "close", "Close")]

    def __init__(self, models: list[ModelInfo], current: str, folder: str):
        super().__init__(classes="dialog-screen")
        self.models = models
        self.current = current
        self.folder = folder

    def compose(self):
        with Vertical(classes="dialog chats"):
            yield Label(f"Models in {self.folder} — Enter loads · Esc closes", classes="dialog-question")
            options = [
                Option(
                    f"{'● ' if m.name == self.current or str(m.path) == self.current else '  '}"
                    f"{m.name}  ·  {m.kind}  ·  {m.precision}  ·  {m.size_gb:.2f} GB",
                    id=str(i),
                )
                for i, m in enumerate(self.models)
            ]
            if not options:
                options = [
                    Option(
                        "No converted models here: run `python convert.py`, or /model PATH", id="none", disabled=True
                    )
                ]
            yield OptionList(*options)

    def on_mount(self) -> None:
        self.query_one(OptionList).focus()

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        if event.option.id and event.option.id.isdigit():
            self.dismiss(str(self.models[int(event.option.id)].path))

    def action_close(self) -> None:
        self.dismiss(None)
