"""The Monitor: CPU, RAM, GPUs, the memory budget, charts of the last minutes (CPU, RAM, VRAM,
tokens/s per model, queue depth, time to first token) and each loaded model's slots."""

from __future__ import annotations

import time
from collections import deque

from textual.app import ComposeResult
from textual.containers import Grid, Horizontal, Vertical, VerticalScroll
from textual.widgets import Sparkline, Static
from textual_plotext import PlotextPlot

from lmx_tui.monitor import ModelStat, MonitorSnapshot
from lmx_tui.widgets.budget import BudgetBar
from server.units import human_size

HISTORY = 60  # samples kept per model for the sparkline
CHART_SECONDS = 300  # the charts show the last five minutes
REDRAW_SECONDS = 1.0  # charts are redrawn at most this often
SLOT_GLYPH = {"idle": "·", "prefill": "▒", "decode": "█"}


def bar(fraction: float, width: int = 24) -> str:
    fraction = min(1.0, max(0.0, fraction))
    full = round(fraction * width)
    return "█" * full + "░" * (width - full)


def slots_line(states: tuple[tuple[str, int], ...]) -> str:
    """`█ decode 312 · ▒ prefill 40 · · idle 120` per slot (tokens its cache holds)."""
    if not states:
        return ""
    cells = [f"{SLOT_GLYPH.get(s, '?')}{i} {s} {n}t" for i, (s, n) in enumerate(states)]
    return "slots  " + "  ".join(cells)


class ModelGauge(Vertical):
    """One loaded model: its tokens/s over the last samples, its figures and its slots."""

    def __init__(self, model: str) -> None:
        super().__init__(classes="model-gauge")
        self.model = model
        self.history: deque[float] = deque([0.0] * HISTORY, maxlen=HISTORY)

    def compose(self) -> ComposeResult:
        with Horizontal(classes="gauge-row"):
            yield Static(self.model, classes="gauge-label")
            yield Sparkline(list(self.history), classes="gauge-spark")
            yield Static("", classes="gauge-figures")
        yield Static("", classes="gauge-slots")

    def apply(self, stat: ModelStat) -> None:
        self.history.append(stat.tokens_per_s)
        self.query_one(Sparkline).data = list(self.history)
        ttft = f"{stat.ttft_ms:.0f} ms" if stat.ttft_ms is not None else "-"
        self.query_one(".gauge-figures", Static).update(
            f"{stat.tokens_per_s:6.1f} tok/s  {stat.slots_busy}/{stat.slots} busy  "
            f"queue {stat.queue_depth}  ttft {ttft}"
        )
        self.query_one(".gauge-slots", Static).update(slots_line(stat.slot_states))


class Chart(PlotextPlot):
    """One labelled time chart: value against seconds ago, one line per series."""

    def __init__(self, title: str, unit: str, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.title = title
        self.unit = unit

    def draw(self, series: dict[str, list[tuple[float, float]]], now: float) -> None:
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        plt.title(self.title)
        plt.xlabel("seconds ago")
        plt.ylabel(self.unit)
        plt.xlim(-CHART_SECONDS, 0)
        top = 0.0
        for name, points in series.items():
            pts = [(t - now, v) for t, v in points if now - t <= CHART_SECONDS]
            if pts:
                label = name if len(series) > 1 else None
                plt.plot([p[0] for p in pts], [p[1] for p in pts], label=label, marker="braille")
                top = max(top, max(p[1] for p in pts))
        plt.ylim(0, top * 1.1 if top > 0 else 1)
        self.refresh()


class GaugesPane(VerticalScroll):
    """Applies each MonitorSnapshot in one batch update (memray's pattern); keeps the last
    minutes of every figure for the charts."""

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        n = int(CHART_SECONDS / 0.25)  # room for the fastest sampling the app uses
        self.series: dict[str, dict[str, deque[tuple[float, float]]]] = {
            k: {} for k in ("cpu", "ram", "vram", "tps", "queue", "ttft")
        }
        self._maxlen = n
        self._drawn = 0.0

    def compose(self) -> ComposeResult:
        yield Static("", id="gauge-system")
        yield Static("", id="gauge-gpu")
        yield BudgetBar(id="monitor-budget")
        with Grid(id="charts"):
            yield Chart("CPU", "%", id="chart-cpu")
            yield Chart("RAM", "GB", id="chart-ram")
            yield Chart("VRAM", "GB", id="chart-vram")
            yield Chart("tokens/s", "tok/s", id="chart-tps")
            yield Chart("queue depth", "requests", id="chart-queue")
            yield Chart("time to first token", "ms", id="chart-ttft")
        yield Static("[b]models[/b]", id="gauge-models-title")
        yield Vertical(id="gauge-models")
        yield Static("no model loaded", id="gauge-empty")

    def _add(self, chart: str, name: str, at: float, value: float) -> None:
        d = self.series[chart].setdefault(name, deque(maxlen=self._maxlen))
        d.append((at, value))

    def apply(self, snap: MonitorSnapshot) -> None:
        s = snap.system
        now = time.monotonic()
        ram = s.ram_used / s.ram_total if s.ram_total else 0.0
        self.query_one("#gauge-system", Static).update(
            f"CPU  {bar(s.cpu_percent / 100)} {s.cpu_percent:5.1f}%\n"
            f"RAM  {bar(ram)} {human_size(s.ram_used)} / {human_size(s.ram_total)}\n"
            f"lmx  RSS {human_size(s.process_rss)}"
        )
        self._add("cpu", "cpu", now, s.cpu_percent)
        self._add("ram", "used", now, s.ram_used / 1e9)
        self._add("ram", "lmx", now, s.process_rss / 1e9)
        if s.gpus:
            lines = [
                f"GPU{g.index} {bar(g.memory_used / g.memory_total if g.memory_total else 0)} "
                f"{human_size(g.memory_used)} / {human_size(g.memory_total)}  util "
                f"{g.utilization}%  {g.name}"
                for g in s.gpus
            ]
            gpu = "\n".join(lines)
            for g in s.gpus:
                self._add("vram", f"gpu{g.index}", now, g.memory_used / 1e9)
        else:
            gpu = s.gpu_note or "no NVIDIA GPU"
        self.query_one("#gauge-gpu", Static).update(gpu)
        self.query_one("#monitor-budget", BudgetBar).apply(snap.memory)
        for m in snap.models:
            self._add("tps", m.model, now, m.tokens_per_s)
            self._add("queue", m.model, now, m.queue_depth)
            if m.ttft_ms is not None:
                self._add("ttft", m.model, now, m.ttft_ms)
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
        self.query_one("#chart-vram", Chart).display = bool(s.gpus)
        if now - self._drawn >= REDRAW_SECONDS:
            self._drawn = now
            self.draw_charts(now)

    def draw_charts(self, now: float) -> None:
        for key, data in self.series.items():
            chart = self.query_one(f"#chart-{key}", Chart)
            if chart.display:
                chart.draw({name: list(points) for name, points in data.items()}, now)
