"""The model browser: every available model, its facts and state; load, unload, details."""

from __future__ import annotations

from typing import ClassVar

from textual import events
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical, VerticalScroll
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import DataTable, Input, Static

from lmx_tui.widgets.budget import BudgetBar
from server.discovery import ModelInfo
from server.units import human_params as params
from server.units import human_size as size

COLUMNS = ("ID", "STATE", "MEMORY", "FITS", "ARCH", "PARAMS", "QUANT", "SIZE", "CTX")
# Narrow terminals drop columns from the front of this list first (then shorten the id).
DROP_ORDER = ("ARCH", "PARAMS", "FITS", "QUANT")
MIN_ID = 18
SORT_KEYS = ("id", "size", "params", "state")


def short_ctx(n: int | None) -> str:
    if not n:
        return "-"
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def fit_columns(rows: list[dict[str, str]], width: int) -> tuple[tuple[str, ...], int | None]:
    """The columns that fit `width` cells, least important dropped first (ARCH, PARAMS, then
    the id is shortened, then FITS and QUANT), and the width the id is cut to (None: whole)."""
    cols = list(COLUMNS)

    def need(c: str) -> int:
        return max([len(c)] + [len(r[c]) for r in rows]) + 2  # a cell's padding

    def id_room() -> int:
        return width - sum(need(c) for c in cols if c != "ID") - 2

    cut = False
    for step in (None, "ARCH", "PARAMS", "ID", "FITS", "QUANT"):
        if step == "ID":
            cut = True
        elif step is not None:
            cols.remove(step)
        if id_room() >= (MIN_ID if cut else need("ID") - 2):
            break
    full = need("ID") - 2
    room = max(MIN_ID, id_room())
    return tuple(cols), (room if room < full else None)


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
        Binding(
            "p",
            "pin",
            "Pin",
            id="models.pin",
            tooltip="Pin or unpin: a pinned model is never evicted and never expires",
        ),
        Binding("s", "sort", "Sort", id="models.sort", tooltip="Cycle the sort column"),
        Binding("slash", "filter", "Filter", id="models.filter", tooltip="Filter by text"),
        Binding("r", "refresh", "Rescan", id="models.rescan", tooltip="Rescan model folders"),
        Binding(
            "escape",
            "leave_filter",
            "Back to the table",
            id="models.leave_filter",
            show=False,
            tooltip="Leave the filter box (its text stays)",
        ),
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
        self.columns: tuple[str, ...] = ()

    def compose(self) -> ComposeResult:
        yield BudgetBar(id="models-budget")
        yield Input(placeholder="filter models ( / )", id="model-filter")
        table: DataTable[str] = DataTable(id="model-table", cursor_type="row", zebra_stripes=True)
        yield table
        yield Static("", id="model-hint")

    def on_resize(self, event: events.Resize) -> None:
        self._render_rows()

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
        cells = []
        for m in rows:
            state = self.states.get(m.id, "available") if m.usable else "unusable"
            if m.unreachable:  # an upstream server that did not answer
                state = "unreachable"
            est, fits = self.memory.get(m.id, (0, False))
            cells.append(
                {
                    "ID": m.id,
                    "STATE": state,
                    "MEMORY": size(est) if est else "-",
                    "FITS": ("yes" if fits else "no") if est else "-",
                    "ARCH": m.architecture or "-",
                    "PARAMS": params(m.parameters),
                    "QUANT": m.quantization or "-",
                    "SIZE": size(m.size_bytes),
                    "CTX": str(m.context_length or "-"),
                }
            )
        # The table's width less its scrollbar; before the first layout, assume 80 columns.
        width = (table.size.width or self.app.size.width - 2) - 2
        cols, id_width = fit_columns(cells, width)
        if cols != COLUMNS or id_width is not None:  # narrow: 8192 reads as 8k first
            for c in cells:
                c["CTX"] = short_ctx(int(c["CTX"])) if c["CTX"].isdigit() else c["CTX"]
            cols, id_width = fit_columns(cells, width)
        if "FITS" not in cols:
            for c in cells:  # no FITS column: the memory cell says it
                if c["FITS"] == "no":
                    c["MEMORY"] += " ✗"
        if cols != self.columns:
            table.clear(columns=True)
            for c in cols:
                table.add_column(c, key=c)
            self.columns = cols
        else:
            table.clear()
        for c, m in zip(cells, rows, strict=True):
            if id_width is not None and len(c["ID"]) > id_width:
                c["ID"] = c["ID"][: id_width - 1] + "…"
            table.add_row(*(c[k] for k in cols), key=m.id)
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

    def action_leave_filter(self) -> None:
        self.query_one(DataTable).focus()

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
