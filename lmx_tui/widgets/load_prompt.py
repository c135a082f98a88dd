"""Asked before a load that would evict models, wait for busy ones, or cannot fit at all: what
would happen (from the scheduler's plan) and the choices."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

from server.load_preview import LoadPreview
from server.units import human_size


class LoadPrompt(ModalScreen[str | None]):
    """Dismissed with "load", "option:N" (a way to make it fit) or None (cancelled)."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "choose('load')", "Load", id="prompt.load"),
        Binding("n,escape", "choose(None)", "Cancel", id="prompt.cancel"),
        *(Binding(str(i), f"option({i})", show=False) for i in range(1, 10)),
    ]

    def __init__(self, preview: LoadPreview, sizes: dict[str, int], note: str = "") -> None:
        super().__init__()
        self.preview = preview
        self.sizes = sizes  # the estimate of each model it would evict or wait for
        self.note = note

    def text(self) -> str:
        p = self.preview
        need = human_size(p.estimate.total)
        if not p.fits_alone:
            lines = [f"[b]{p.model} does not fit[/b]", "", p.reason + ".", ""]
            if p.options:
                lines.append("What would make it fit:")
                for i, o in enumerate(p.options, 1):
                    lines.append(f"  [b]{i}[/b]  {o.describe()}")
            else:
                lines.append("Nothing would: raise the budget with --max-memory.")
            if self.note:
                lines += ["", self.note]
            lines += ["", "a number picks an option · esc closes"]
            return "\n".join(lines)
        if p.victims:
            lines = [
                f"[b]Load {p.model}?[/b] It needs about {need}.",
                "",
                "To make room lmx would unload (idle, least recently used first):",
            ]
            lines += [f"  • {v} ({human_size(self.sizes.get(v, 0))})" for v in p.victims]
        else:
            lines = [
                f"[b]Load {p.model}?[/b] It needs about {need}, and does not fit now:",
                "",
                "these models are busy or pinned and would have to go first:",
            ]
            lines += [f"  • {v} ({human_size(self.sizes.get(v, 0))})" for v in p.blocked_by]
            lines += ["", "The load waits for busy models to finish (up to --load-timeout)."]
        lines += ["", "[b]y[/b] load · [b]n[/b] / esc cancel"]
        return "\n".join(lines)

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="prompt-box"):
            yield Static(self.text(), id="prompt-text", markup=True)

    def action_choose(self, choice: str | None) -> None:
        if choice == "load" and not self.preview.fits_alone:
            return  # nothing to confirm: it cannot load as it is
        self.dismiss(choice)

    def action_option(self, n: int) -> None:
        if not self.preview.fits_alone and 1 <= n <= len(self.preview.options):
            self.dismiss(f"option:{n - 1}")
