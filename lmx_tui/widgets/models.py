"""The model browser: every available model, its facts and state; load, unload, details."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical, VerticalScroll
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import DataTable, Input, Static

from server.discovery import ModelInfo
from server.units import human_params as params
from server.units import human_size as size

COLUMNS = ("ID", "STATE", "MEMORY", "FITS", "ARCH", "PARAMS", "QUANT", "SIZE", "CTX")
SORT_KEYS = ("id", "size", "params", "state")


class ModelBrowser(Vertical):
    """A filterable, sortable table of models. Sends intents; the app acts on them."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("l", "load", "Load", id="models.load", tooltip="Load the selected model"),
        Binding("u", "unload", "Unload", id="models.unload", tooltip="Unload the selected model"),
        Binding(
            "enter",
            "details",
            "Details",
            id="models.details",
            tooltip="GGUF metadata and chat template",
        ),
        Binding("s", "sort", "Sort", id="models.sort", tooltip="Cycle the sort column"),
        Binding("slash", "filter", "Filter", id="models.filter", tooltip="Filter by text"),
        Binding("r", "refresh", "Rescan", id="models.rescan", tooltip="Rescan model folders"),
    ]

    class Load(Message):
        """Load this model."""

        def __init__(self, model_id: str) -> None:
            super().__init__()
            self.model_id = model_id

    class Unload(Message):
        """Unload this model."""

        def __init__(self, model_id: str) -> None:
            super().__init__()
            self.model_id = model_id

    class Rescan(Message):
        """Look for models again."""

    class Pin(Message):
        """Toggle this model's pin."""

        def __init__(self, model_id: str) -> None:
            super().__init__()
            self.model_id = model_id

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.models: list[ModelInfo] = []
        self.states: dict[str, str] = {}
        self.memory: dict[str, tuple[int, bool]] = {}
        self.sort_key = "id"

    def compose(self) -> ComposeResult:
        yield Input(placeholder="filter models ( / )", id="model-filter")
        table: DataTable[str] = DataTable(id="model-table", cursor_type="row", zebra_stripes=True)
        yield table
        yield Static("", id="model-hint")

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        for c in COLUMNS:
            table.add_column(c, key=c)

    def show(
        self,
        models: list[ModelInfo],
        states: dict[str, str],
        memory: dict[str, tuple[int, bool]] | None = None,
    ) -> None:
        """Attributes down: the catalogue, loaded states, and (estimate, fits) per model."""
        self.models, self.states = models, states
        if memory is not None:
            self.memory = memory
        self._render_rows()

    @property
    def selected(self) -> str | None:
        table = self.query_one(DataTable)
        if table.row_count == 0:
            return None
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key
        return str(key.value) if key.value is not None else None

    def _render_rows(self) -> None:
        table = self.query_one(DataTable)
        keep = self.selected
        text = self.query_one("#model-filter", Input).value.strip().lower()
        rows = [m for m in self.models if text in m.id or text in (m.architecture or "")]
        order = {
            "id": lambda m: m.id,
            "size": lambda m: -m.size_bytes,
            "params": lambda m: -(m.parameters or 0),
            "state": lambda m: (self.states.get(m.id, "available") == "available", m.id),
        }[self.sort_key]
        rows.sort(key=order)  # type: ignore[arg-type]
        table.clear()
        for m in rows:
            state = self.states.get(m.id, "available") if m.usable else "unusable"
            if m.unreachable:  # an upstream server that did not answer
                state = "unreachable"
            est, fits = self.memory.get(m.id, (0, False))
            table.add_row(
                m.id,
                state,
                size(est) if est else "-",
                ("yes" if fits else "no") if est else "-",
                m.architecture or "-",
                params(m.parameters),
                m.quantization or "-",
                size(m.size_bytes),
                str(m.context_length or "-"),
                key=m.id,
            )
        if keep is not None and keep in {m.id for m in rows}:
            table.move_cursor(row=table.get_row_index(keep))
        hint = f"{len(rows)} of {len(self.models)} models · sorted by {self.sort_key}"
        bad = [m for m in rows if not m.usable]
        if bad:
            hint += f" · {len(bad)} unusable (enter shows why)"
        self.query_one("#model-hint", Static).update(hint)

    def on_input_changed(self, event: Input.Changed) -> None:
        self._render_rows()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.query_one(DataTable).focus()

    def action_filter(self) -> None:
        self.query_one("#model-filter", Input).focus()

    def action_sort(self) -> None:
        self.sort_key = SORT_KEYS[(SORT_KEYS.index(self.sort_key) + 1) % len(SORT_KEYS)]
        self._render_rows()

    def action_load(self) -> None:
        if self.selected:
            self.post_message(self.Load(self.selected))

    def action_unload(self) -> None:
        if self.selected:
            self.post_message(self.Unload(self.selected))

    def action_pin(self) -> None:
        if self.selected:
            self.post_message(self.Pin(self.selected))

    def action_refresh(self) -> None:
        self.post_message(self.Rescan())

    def action_details(self) -> None:
        model = next((m for m in self.models if m.id == self.selected), None)
        if model is not None:
            self.app.push_screen(ModelDetails(model))

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_details()


class ModelDetails(ModalScreen[None]):
    """Everything the GGUF header says about one model."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,q", "dismiss", "Close", id="details.close"),
    ]

    def __init__(self, model: ModelInfo) -> None:
        super().__init__()
        self.model = model

    def compose(self) -> ComposeResult:
        m = self.model
        lines = [
            f"[b]{m.id}[/b]",
            f"file      {m.path}",
            f"source    {m.source}",
            f"size      {size(m.size_bytes)}",
        ]
        if not m.usable:
            lines.append(f"[red]unusable: {m.error}[/red]")
        if m.header is not None:
            h = m.header
            lines += [
                f"arch      {h.architecture}",
                f"params    {params(h.parameter_count)} ({h.parameter_count:,})",
                f"quant     {h.quantization}",
                f"context   {h.context_length}",
                f"tensors   {len(h.tensors)}",
                "",
                "[b]metadata[/b]",
            ]
            for k, v in sorted(h.metadata.items()):
                if k == "tokenizer.chat_template":
                    continue
                text = str(v)
                lines.append(f"  {k} = {text[:100]}{'…' if len(text) > 100 else ''}")
            lines += [
                "",
                "[b]chat template[/b]",
                h.chat_template
                or "(none: llama.cpp's built-in template for this architecture is used)",
            ]
        with VerticalScroll(id="details-box"):
            yield Static("\n".join(lines), id="details-text", markup=True)
            yield Static("esc: close", id="details-hint")
