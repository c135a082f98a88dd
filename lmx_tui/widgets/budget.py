"""The memory budget as a bar per device: each loaded model's share (estimated, with what was
measured), pinned models marked, and what is left."""

from __future__ import annotations

from rich.text import Text
from textual.widget import Widget

from lmx_tui.monitor import MemorySnapshot
from server.units import human_size

CACHE_STYLE = "cyan"
PALETTE = ("dodger_blue1", "green3", "dark_orange", "medium_purple1", "gold1", "deep_pink2")


def device_label(device: str) -> str:
    return "RAM" if device == "ram" else f"GPU {device.removeprefix('gpu')}"


class BudgetBar(Widget):
    """Renders the last MemorySnapshot at the width it has."""

    DEFAULT_CSS = """
    BudgetBar { height: auto; }
    """

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.memory = MemorySnapshot((), ())

    def apply(self, memory: MemorySnapshot) -> None:
        if memory != self.memory:
            self.memory = memory
            self.refresh(layout=True)

    def get_content_height(self, container: object, viewport: object, width: int) -> int:
        return max(1, len(self.memory.budgets) * 2)

    def render(self) -> Text:
        mem = self.memory
        width = max(20, self.size.width - 1)  # the last cell stays free: no wrap at the edge
        out = Text()
        if not mem.budgets:
            return Text("memory budget: sampling…", style="dim")
        colour = {m.model: PALETTE[i % len(PALETTE)] for i, m in enumerate(mem.models)}
        for k, (device, budget) in enumerate(mem.budgets):
            if k:
                out.append("\n")
            used = mem.used(device)
            free = max(0, budget - used)
            head = f"{device_label(device)} {human_size(budget)} "
            over = used > budget
            tail = f" over by {human_size(used - budget)}" if over else f" {human_size(free)} free"
            bar_w = max(10, width - len(head) - len(tail))
            out.append(head, style="bold")
            filled = 0
            for m in mem.models:
                share = dict(m.by_device).get(device, 0)
                cells = round(bar_w * share / budget) if budget else 0
                cells = max(1, min(cells, bar_w - filled)) if share else 0
                if cells:
                    # Measured below the estimate shows as the solid part of the segment.
                    solid = cells
                    if m.measured and share and device == "ram":  # measured: process RSS
                        solid = max(1, min(cells, round(cells * m.measured / share)))
                    out.append("█" * solid, style=colour[m.model])
                    out.append("▓" * (cells - solid), style=colour[m.model])
                    filled += cells
            if device == "ram" and mem.cache_ram and filled < bar_w:
                cells = round(bar_w * mem.cache_ram / budget) if budget else 0
                cells = max(1, min(cells, bar_w - filled))
                out.append("▒" * cells, style=CACHE_STYLE)
                filled += cells
            out.append("░" * max(0, bar_w - filled), style="grey50")
            out.append(tail, style="red bold" if over else "")
            legend = Text("\n")
            if not mem.models:
                legend.append("  no model loaded", style="dim")
            for m in mem.models:
                if not dict(m.by_device).get(device):
                    continue
                legend.append("  ■ ", style=colour[m.model])
                pin = " [pinned]" if m.pinned else ""
                measured = ""
                if m.measured and device == "ram":
                    measured = f" / {human_size(m.measured)} measured"
                share = dict(m.by_device)[device]
                legend.append(f"{m.model}{pin} {human_size(share)} est{measured}")
            if device == "ram" and (mem.cache_ram or mem.cache_disk):
                legend.append("  ■ ", style=CACHE_STYLE)
                held = [f"{human_size(mem.cache_ram)} in RAM"] if mem.cache_ram else []
                held += [f"{human_size(mem.cache_disk)} on disk"] if mem.cache_disk else []
                n = mem.cache_entries
                legend.append(
                    f"prompt cache {', '.join(held)} ({n} prefix{'es' if n != 1 else ''})"
                )
            legend.truncate(width + 1, overflow="ellipsis")
            out.append_text(legend)
        return out
