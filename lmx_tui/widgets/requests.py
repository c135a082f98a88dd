"""Requests in flight (API and chat alike, live from the engine), recent ones with their
details, and the server's log, followed and filtered by level and text (a model's name)."""

from __future__ import annotations

import time
from collections import deque
from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import DataTable, Input, RichLog, Static

from lmx_tui.logs import LogEntry
from server.pipeline import RunStatus
from server.telemetry import RequestDetail, RequestRecord

COLUMNS = (
    "TIME",
    "STATUS",
    "MODEL",
    "PATH",
    "PROMPT",
    "OUT",
    "CACHED",
    "TTFT",
    "LATENCY",
    "FROM",
    "END",
)
LIVE_COLUMNS = ("ID", "MODEL", "FROM", "SLOT", "PHASE", "PROMPT", "OUT", "CACHED", "TOK/S", "AGE")
MAX_ROWS = 200
LOG_LINES = 2000
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def live_row(s: RunStatus) -> tuple[str, ...]:
    slots = ",".join(str(n) for n in s.slots) or "-"
    phase = s.phase
    if phase == "prefill" and s.prompt_tokens:
        phase = f"prefill {100 * s.prompt_done // s.prompt_tokens}%"
    return (
        s.id,
        s.model,
        s.source,
        slots,
        phase,
        str(s.prompt_tokens),
        str(s.generated),
        str(s.cached),
        f"{s.tokens_per_s:.1f}",
        f"{s.age_s:.1f}s",
    )


class RequestsPane(Vertical):
    """In flight (top), recent (middle, newest last), log (bottom)."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding(
            "x",
            "cancel",
            "Cancel request",
            id="requests.cancel",
            tooltip="Cancel the selected request in flight (its client gets the end of it)",
        ),
        Binding("v", "level", "Log level", id="requests.level", tooltip="Cycle the log level"),
        Binding("slash", "filter", "Filter log", id="requests.filter", tooltip="Filter the log"),
        Binding("f", "follow", "Follow", id="requests.follow", tooltip="Follow the log's end"),
    ]

    class Cancel(Message):
        """Cancel this request in flight."""

        def __init__(self, request_id: str) -> None:
            super().__init__()
            self.request_id = request_id

    class Detail(Message):
        """Show this finished request."""

        def __init__(self, record: RequestRecord) -> None:
            super().__init__()
            self.record = record

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.entries: deque[LogEntry] = deque(maxlen=LOG_LINES)
        self.level = "INFO"
        self.text = ""
        self.follow = True
        self.records: dict[str, RequestRecord] = {}
        self._rows = 0

    def compose(self) -> ComposeResult:
        yield Static("[b]in flight[/b] · x cancels the selected one", id="inflight-title")
        live: DataTable[str] = DataTable(id="inflight-table", cursor_type="row")
        yield live
        yield Static("[b]recent[/b] · enter shows a request", id="recent-title")
        table: DataTable[str] = DataTable(id="requests-table", cursor_type="row")
        yield table
        with Horizontal(id="log-bar"):
            yield Static("", id="log-state")
            yield Input(placeholder="filter the log (text, a model) /", id="log-filter")
        yield RichLog(id="server-log", max_lines=LOG_LINES, markup=False, wrap=True)

    def on_mount(self) -> None:
        for c in LIVE_COLUMNS:
            self.query_one("#inflight-table", DataTable).add_column(c, key=c)
        for c in COLUMNS:
            self.query_one("#requests-table", DataTable).add_column(c, key=c)
        self._log_state()

    # ----- in flight -------------------------------------------------------------------------

    def show_in_flight(self, statuses: tuple[RunStatus, ...]) -> None:
        table = self.query_one("#inflight-table", DataTable)
        have = {str(k.value) for k in table.rows}
        want = {s.id for s in statuses}
        for key in have - want:
            table.remove_row(key)
        for s in statuses:
            row = live_row(s)
            if s.id in have:
                for col, value in zip(LIVE_COLUMNS, row, strict=True):
                    table.update_cell(s.id, col, value, update_width=True)
            else:
                table.add_row(*row, key=s.id)
        self.query_one("#inflight-title", Static).update(
            f"[b]in flight[/b] {len(statuses)} · x cancels the selected one"
        )

    def action_cancel(self) -> None:
        table = self.query_one("#inflight-table", DataTable)
        if table.row_count:
            key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
            if key is not None:
                self.post_message(self.Cancel(str(key)))

    # ----- recent ----------------------------------------------------------------------------

    def add(self, rec: RequestRecord) -> None:
        table = self.query_one("#requests-table", DataTable)
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
            rec.source,
            rec.finish_reason or "-",
        )
        self._rows += 1
        key = rec.id or f"row-{self._rows}"
        self.records[key] = rec
        table.add_row(*row, key=key)
        if table.row_count > MAX_ROWS:
            first = next(iter(table.rows))
            self.records.pop(str(first.value), None)
            table.remove_row(first)
        table.move_cursor(row=table.row_count - 1)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if event.data_table.id == "requests-table" and event.row_key.value is not None:
            rec = self.records.get(str(event.row_key.value))
            if rec is not None:
                self.post_message(self.Detail(rec))

    # ----- the log ---------------------------------------------------------------------------

    def _shown(self, e: LogEntry) -> bool:
        if e.levelno < LEVELS.index(self.level) * 10 + 10:
            return False
        return not self.text or self.text in e.text.lower()

    def log_entry(self, entry: LogEntry) -> None:
        self.entries.append(entry)
        if self._shown(entry):
            self.query_one(RichLog).write(entry.text, scroll_end=self.follow)

    def _rewrite(self) -> None:
        log = self.query_one(RichLog)
        log.clear()
        for e in self.entries:
            if self._shown(e):
                log.write(e.text, scroll_end=self.follow)
        self._log_state()

    def _log_state(self) -> None:
        follow = "following" if self.follow else "paused (f follows)"
        self.query_one("#log-state", Static).update(f"[b]log[/b] ≥ {self.level} (v) · {follow}")

    def action_level(self) -> None:
        self.level = LEVELS[(LEVELS.index(self.level) + 1) % len(LEVELS)]
        self._rewrite()

    def action_follow(self) -> None:
        self.follow = not self.follow
        log = self.query_one(RichLog)
        log.auto_scroll = self.follow
        if self.follow:
            log.scroll_end(animate=False)
        self._log_state()

    def action_filter(self) -> None:
        self.query_one("#log-filter", Input).focus()

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "log-filter":
            self.text = event.value.strip().lower()
            self._rewrite()


class RequestDetailScreen(ModalScreen[None]):
    """One finished request: its messages, reply, reasons and timings."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,q", "dismiss", "Close", id="request.close"),
    ]

    def __init__(self, record: RequestRecord, detail: RequestDetail | None) -> None:
        super().__init__()
        self.record = record
        self.detail = detail

    def compose(self) -> ComposeResult:
        r, d = self.record, self.detail
        ttft = f"{r.ttft_ms:.0f} ms" if r.ttft_ms is not None else "-"
        head = [
            f"{r.id or '(no id)'} · {r.model or '-'} · {r.path} · from {r.source} · "
            f"status {r.status}",
            f"prompt {r.prompt_tokens} tokens ({r.cached_tokens} cached) · reply "
            f"{r.completion_tokens} tokens · ttft {ttft} · latency {r.latency_ms:.0f} ms",
        ]
        parts: list[Static] = [Static("\n".join(head), classes="detail-head", markup=False)]
        if d is None:
            parts.append(Static("(no messages kept for this request)", classes="detail-note"))
        else:
            for m in d.messages:
                parts.append(self._block(m["role"], m["content"]))
            for i, p in enumerate(d.prompts):
                parts.append(self._block(f"prompt {i}" if len(d.prompts) > 1 else "prompt", p))
            for i, text in enumerate(d.replies):
                reason = d.finish_reasons[i] if i < len(d.finish_reasons) else "-"
                title = f"reply ({reason})" if len(d.replies) == 1 else f"reply {i} ({reason})"
                parts.append(self._block(title, text or "(empty)"))
            if d.error:
                parts.append(Static(f"error: {d.error}", classes="detail-note"))
            for t in d.timings[:1]:
                figures = " · ".join(f"{k} {v}" for k, v in t.items())
                parts.append(Static(f"timings: {figures}", classes="detail-note", markup=False))
        with VerticalScroll(id="request-box"):
            yield from parts
            yield Static("esc closes", classes="detail-note")

    @staticmethod
    def _block(title: str, text: str) -> Static:
        w = Static(text, classes="detail-block", markup=False)
        w.border_title = title
        return w
