"""The download queue: one row per download with a progress bar, rate and ETA."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import DataTable, Static

from server.downloads import Download
from server.units import human_size

COLUMNS = ("FILE", "STATE", "PROGRESS", "DONE", "RATE", "ETA")


def progress_bar(done: int, total: int, width: int = 20) -> str:
    frac = done / total if total else 0.0
    full = int(frac * width)
    return "█" * full + "░" * (width - full) + f" {frac * 100:3.0f}%"


class DownloadsPane(Vertical):
    """Shows the queue; cancel, pause and resume are intents the app carries out."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding(
            "c",
            "act('cancel')",
            "Cancel",
            id="downloads.cancel",
            tooltip="Cancel the download and delete its partial file",
        ),
        Binding("p", "act('pause')", "Pause", id="downloads.pause"),
        Binding("r", "act('resume')", "Resume", id="downloads.resume"),
    ]

    class Act(Message):
        """Cancel, pause or resume one download."""

        def __init__(self, job_id: str, action: str) -> None:
            super().__init__()
            self.job_id, self.action = job_id, action

    def compose(self) -> ComposeResult:
        table: DataTable[str] = DataTable(id="downloads-table", cursor_type="row")
        yield table
        yield Static(
            "no downloads: find models in the Hub tab, or `lmx pull ORG/REPO`", id="downloads-empty"
        )

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        for c in COLUMNS:
            table.add_column(c, key=c)

    def show(self, downloads: list[Download]) -> None:
        table = self.query_one(DataTable)
        rows = {str(k.value) for k in table.rows}
        for d in downloads:
            eta = f"{d.eta:.0f}s" if d.eta is not None else "-"
            rate = f"{human_size(int(d.rate))}/s" if d.state == "running" else "-"
            state = d.state if not d.error else f"{d.state}: {d.error[:40]}"
            cells = (
                d.filename,
                state,
                progress_bar(d.done, d.size),
                f"{human_size(d.done)} / {human_size(d.size)}",
                rate,
                eta,
            )
            if d.id in rows:
                for col, value in zip(COLUMNS, cells, strict=True):
                    table.update_cell(d.id, col, value, update_width=True)
            else:
                table.add_row(*cells, key=d.id)
        self.query_one("#downloads-empty", Static).display = not downloads

    def action_act(self, action: str) -> None:
        table = self.query_one(DataTable)
        if table.row_count:
            key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
            if key is not None:
                self.post_message(self.Act(str(key), action))
