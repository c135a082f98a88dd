"""Recent API requests and the server's log lines."""

from __future__ import annotations

import time

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import DataTable, RichLog

from server.telemetry import RequestRecord

COLUMNS = ("TIME", "STATUS", "MODEL", "PATH", "PROMPT", "OUT", "CACHED", "TTFT", "LATENCY")
MAX_ROWS = 200


class RequestsPane(Vertical):
    """Newest request first; log lines below."""

    def compose(self) -> ComposeResult:
        table: DataTable[str] = DataTable(id="requests-table", cursor_type="row")
        yield table
        yield RichLog(id="server-log", max_lines=500, markup=False, wrap=True)

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        for c in COLUMNS:
            table.add_column(c, key=c)

    def add(self, rec: RequestRecord) -> None:
        table = self.query_one(DataTable)
        ttft = f"{rec.ttft_ms:.0f} ms" if rec.ttft_ms is not None else "-"
        row = (
            time.strftime("%H:%M:%S", time.localtime(rec.at)),
            str(rec.status),
            rec.model or "-",
            rec.path,
            str(rec.prompt_tokens),
            str(rec.completion_tokens),
            str(rec.cached_tokens),
            ttft,
            f"{rec.latency_ms:.0f} ms",
        )
        table.add_row(*row)
        if table.row_count > MAX_ROWS:
            table.remove_row(next(iter(table.rows)))
        table.move_cursor(row=table.row_count - 1)

    def log_line(self, text: str) -> None:
        self.query_one(RichLog).write(text)
