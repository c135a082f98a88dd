"""The help screen: every key of the app and of the pane in focus."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static


class HelpScreen(ModalScreen[None]):
    """Every binding of the app and of the pane in focus."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,q,f1", "dismiss", "Close")]

    def __init__(self, rows: list[tuple[str, str]]) -> None:
        super().__init__()
        self.rows = rows

    def compose(self) -> ComposeResult:
        width = max(len(k) for k, _ in self.rows)
        text = "\n".join(f"  {k.ljust(width)}  {d}" for k, d in self.rows)
        with VerticalScroll(id="help-box"):
            yield Static(
                f"[b]lmx keys[/b]\n\n{text}\n\n  esc closes this help", id="help-text", markup=True
            )
