"""Live gauges: CPU, RAM, GPUs, and per-model throughput, slots, queue and TTFT."""

from __future__ import annotations

from collections import deque

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Sparkline, Static

from lmx_tui.monitor import ModelStat, MonitorSnapshot
from server.units import human_size

HISTORY = 60  # samples kept per model for the sparkline (30 s at 2 Hz)


def bar(fraction: float, width: int = 24) -> str:
    fraction = min(1.0, max(0.0, fraction))
    full = round(fraction * width)
    return "█" * full + "░" * (width - full)


class ModelGauge(Horizontal):
    """One loaded model: its tokens/s over the last 30 s and its current figures."""

    def __init__(self, model: str) -> None:
        super().__init__(classes="model-gauge")
        self.model = model
        self.history: deque[float] = deque([0.0] * HISTORY, maxlen=HISTORY)

    def compose(self) -> ComposeResult:
        yield Static(self.model, classes="gauge-label")
        yield Sparkline(list(self.history), classes="gauge-spark")
        yield Static("", classes="gauge-figures")

    def apply(self, stat: ModelStat) -> None:
        self.history.append(stat.tokens_per_s)
        self.query_one(Sparkline).data = list(self.history)
        ttft = f"{stat.ttft_ms:.0f} ms" if stat.ttft_ms is not None else "-"
        self.query_one(".gauge-figures", Static).update(
            f"{stat.tokens_per_s:6.1f} tok/s  {stat.slots_busy}/{stat.slots} busy  "
            f"queue {stat.queue_depth}  ttft {ttft}"
        )


class GaugesPane(VerticalScroll):
    """Applies each MonitorSnapshot in one batch update (memray's pattern)."""

    def compose(self) -> ComposeResult:
        yield Static("", id="gauge-system")
        yield Static("", id="gauge-gpu")
        yield Static("[b]models[/b]", id="gauge-models-title")
        yield Vertical(id="gauge-models")
        yield Static("no model loaded", id="gauge-empty")

    def apply(self, snap: MonitorSnapshot) -> None:
        s = snap.system
        ram = s.ram_used / s.ram_total if s.ram_total else 0.0
        self.query_one("#gauge-system", Static).update(
            f"CPU  {bar(s.cpu_percent / 100)} {s.cpu_percent:5.1f}%\n"
            f"RAM  {bar(ram)} {human_size(s.ram_used)} / {human_size(s.ram_total)}\n"
            f"lmx  RSS {human_size(s.process_rss)}"
        )
        if s.gpus:
            lines = [
                f"GPU{g.index} {bar(g.memory_used / g.memory_total if g.memory_total else 0)} "
                f"{human_size(g.memory_used)} / {human_size(g.memory_total)}  util "
                f"{g.utilization}%  {g.name}"
                for g in s.gpus
            ]
            gpu = "\n".join(lines)
        else:
            gpu = s.gpu_note or "no NVIDIA GPU"
        self.query_one("#gauge-gpu", Static).update(gpu)
        box = self.query_one("#gauge-models", Vertical)
        have = {g.model: g for g in box.query(ModelGauge)}
        wanted = {m.model for m in snap.models}
        for name, g in have.items():
            if name not in wanted:
                g.remove()
        for stat in snap.models:
            g = have.get(stat.model)
            if g is None:
                g = ModelGauge(stat.model)
                box.mount(g)
                g.call_after_refresh(g.apply, stat)
            else:
                g.apply(stat)
        self.query_one("#gauge-empty", Static).display = not snap.models
