"""Search the Hugging Face hub and pull a model: repositories, then their GGUF choices."""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import DataTable, Input, Static

from lmx_tui.widgets.downloads import progress_bar
from server import hub
from server.downloads import Download
from server.errors import LmxError
from server.load_preview import hub_repo
from server.runtime import Runtime
from server.units import human_size

REPO_COLUMNS = ("REPOSITORY", "DOWNLOADS", "LIKES", "SIZES", "FITS THE BUDGET")
FILE_COLUMNS = ("FILE", "QUANT", "SIZE", "FITS", "ON DISK")


def short_count(n: int) -> str:
    if n >= 1_000_000:
        return f"{n / 1e6:.1f}M"
    return f"{n / 1e3:.1f}k" if n >= 10_000 else str(n)


class HubPane(Vertical):
    """Enter on a repository lists its files; enter on a file pulls it."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("slash", "focus_search", "Search", id="hub.search"),
        Binding(
            "escape",
            "leave_search",
            "Back to the results",
            id="hub.leave_search",
            show=False,
            tooltip="Leave the search box",
        ),
    ]

    class Pull(Message):
        """Download this model (all its files)."""

        def __init__(self, repo: str, file: str) -> None:
            super().__init__()
            self.repo, self.file = repo, file

    class Summary(Message):
        """A repository's sizes and the quantizations that fit (from a worker thread)."""

        def __init__(self, repo: str, summary: dict[str, Any] | None) -> None:
            super().__init__()
            self.repo, self.summary = repo, summary

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
        for c in REPO_COLUMNS:
            self.query_one("#hub-repos", DataTable).add_column(c, key=c)
        for c in FILE_COLUMNS:
            self.query_one("#hub-files", DataTable).add_column(c, key=c)

    def action_focus_search(self) -> None:
        self.query_one("#hub-query", Input).focus()

    def action_leave_search(self) -> None:
        self.query_one("#hub-repos", DataTable).focus()

    def on_input_changed(self, event: Input.Changed) -> None:
        # `/` is the key that focuses this box: pressed when it already has the focus, it
        # must not become the query's first character (a repository name never starts so).
        if event.input.id == "hub-query" and event.value == "/":
            event.input.value = ""

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
            table.add_row(
                r["id"], short_count(r["downloads"]), short_count(r["likes"]), "…", "…", key=r["id"]
            )
        status.update(f"{len(rows)} repositories · enter lists a repository's files")
        table.focus()
        self.summarise([r["id"] for r in rows])

    @work(thread=True, exclusive=True, group="hub-summaries")
    def summarise(self, repos: list[str]) -> None:
        """Each result's sizes and fitting quantizations, filled in as they arrive."""
        budget = self.rt.scheduler.budget
        for repo in repos:
            try:
                summary: dict[str, Any] | None = hub.summary(hub.listing(repo, budget))
            except LmxError:
                summary = None
            self.post_message(self.Summary(repo, summary))

    def on_hub_pane_summary(self, message: Summary) -> None:
        table = self.query_one("#hub-repos", DataTable)
        if message.repo not in {str(k.value) for k in table.rows}:
            return
        s = message.summary
        if s is None:
            sizes, fit = "?", "?"
        else:
            lo, hi = human_size(s["size_min"]), human_size(s["size_max"])
            sizes = lo if lo == hi else f"{lo} to {hi}"
            fit = ", ".join(s["fit"][:4]) + ("…" if len(s["fit"]) > 4 else "") or "none"
        table.update_cell(message.repo, "SIZES", sizes, update_width=True)
        table.update_cell(message.repo, "FITS THE BUDGET", fit, update_width=True)

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
        local = self.on_disk(repo)
        for f in listing["files"]:
            mark = " *" if f["name"] == listing["recommended"] else ""
            table.add_row(
                f["name"] + mark,
                f["quantization"] or "-",
                human_size(f["size"]),
                "yes" if f["fits"] else "no",
                "✓ " + local[f["name"]] if f["name"] in local else "",
                key=f["name"],
            )
        status.update(f"{repo}: * recommended · ✓ on disk · enter pulls the selected file")
        table.focus()

    def on_disk(self, repo: str) -> dict[str, str]:
        """File name -> model id, for the files of `repo` already in the Hugging Face cache."""
        out = {}
        for m in self.rt.catalog.models():
            if (hub_repo(m) or "").lower() == repo.lower():
                out[m.path.name] = m.id
        return out

    def show_download(self, d: Download) -> None:
        """A pull of ours moved: its progress on the status line."""
        status = self.query_one("#hub-status", Static)
        if d.state in ("queued", "running", "paused"):
            rate = f" · {human_size(int(d.rate))}/s" if d.rate else ""
            status.update(
                f"pulling {d.filename} {progress_bar(d.done, d.size, 16)} "
                f"{human_size(d.done)} / {human_size(d.size)}{rate} · F7: downloads"
            )
        elif d.state == "done":
            status.update(f"pulled {d.filename} ✓")
        else:
            status.update(f"{d.filename}: {d.state} {d.error or ''}".strip())

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        key = event.row_key.value
        if key is None:
            return
        if event.data_table.id == "hub-repos":
            self.list_files(str(key))
        elif event.data_table.id == "hub-files" and self.repo:
            self.post_message(self.Pull(self.repo, str(key)))


class PulledPrompt(ModalScreen[str | None]):
    """A download finished: load the model, chat with it, or later."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("l", "choose('load')", "Load", id="pulled.load"),
        Binding("c", "choose('chat')", "Chat", id="pulled.chat"),
        Binding("escape,n", "choose(None)", "Later", id="pulled.later"),
    ]

    def __init__(self, model_id: str) -> None:
        super().__init__()
        self.model_id = model_id

    def compose(self) -> ComposeResult:
        with Vertical(id="prompt-box"):
            yield Static(
                f"[b]{self.model_id}[/b] is downloaded and verified.\n\n"
                "[b]l[/b] load it · [b]c[/b] chat with it · esc later",
                id="prompt-text",
                markup=True,
            )

    def action_choose(self, choice: str | None) -> None:
        self.dismiss(choice)
