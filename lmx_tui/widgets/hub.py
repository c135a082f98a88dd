"""Search the Hugging Face hub and pull a model: repositories, then their GGUF choices."""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import DataTable, Input, Static

from server import hub
from server.errors import LmxError
from server.runtime import Runtime
from server.units import human_size


class HubPane(Vertical):
    """Enter on a repository lists its files; enter on a file pulls it."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("slash", "focus_search", "Search", id="hub.search"),
    ]

    class Pull(Message):
        """Download this model (all its files)."""

        def __init__(self, repo: str, file: str) -> None:
            super().__init__()
            self.repo, self.file = repo, file

    def __init__(self, rt: Runtime, **kw: Any) -> None:
        super().__init__(**kw)
        self.rt = rt
        self.repo: str | None = None

    def compose(self) -> ComposeResult:
        yield Input(placeholder="search the hub for GGUF models (enter)", id="hub-query")
        repos: DataTable[str] = DataTable(id="hub-repos", cursor_type="row")
        yield repos
        files: DataTable[str] = DataTable(id="hub-files", cursor_type="row")
        yield files
        yield Static("", id="hub-status")

    def on_mount(self) -> None:
        for c in ("REPOSITORY", "DOWNLOADS", "LIKES"):
            self.query_one("#hub-repos", DataTable).add_column(c, key=c)
        for c in ("FILE", "QUANT", "SIZE", "FITS"):
            self.query_one("#hub-files", DataTable).add_column(c, key=c)

    def action_focus_search(self) -> None:
        self.query_one("#hub-query", Input).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.value.strip():
            self.search(event.value.strip())

    @work(exclusive=True, group="hub")
    async def search(self, text: str) -> None:
        status = self.query_one("#hub-status", Static)
        status.update(f"searching for {text!r}…")
        try:
            rows = await asyncio.to_thread(hub.search, text)
        except LmxError as e:
            status.update(f"error: {e.message}")
            return
        table = self.query_one("#hub-repos", DataTable)
        table.clear()
        for r in rows:
            table.add_row(r["id"], str(r["downloads"]), str(r["likes"]), key=r["id"])
        status.update(f"{len(rows)} repositories · enter lists a repository's files")
        table.focus()

    @work(exclusive=True, group="hub")
    async def list_files(self, repo: str) -> None:
        status = self.query_one("#hub-status", Static)
        status.update(f"listing {repo}…")
        try:
            listing = await asyncio.to_thread(hub.listing, repo, self.rt.scheduler.budget)
        except LmxError as e:
            status.update(f"error: {e.message}")
            return
        self.repo = repo
        table = self.query_one("#hub-files", DataTable)
        table.clear()
        for f in listing["files"]:
            mark = " *" if f["name"] == listing["recommended"] else ""
            table.add_row(
                f["name"] + mark,
                f["quantization"] or "-",
                human_size(f["size"]),
                "yes" if f["fits"] else "no",
                key=f["name"],
            )
        status.update(f"{repo}: * recommended · enter pulls the selected file")
        table.focus()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        key = event.row_key.value
        if key is None:
            return
        if event.data_table.id == "hub-repos":
            self.list_files(str(key))
        elif event.data_table.id == "hub-files" and self.repo:
            self.post_message(self.Pull(self.repo, str(key)))
