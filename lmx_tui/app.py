"""The lmx terminal app: model browser, chat, gauges and requests over the embedded server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import replace
from functools import wraps
from pathlib import Path
from typing import Any, ClassVar

from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.css.query import NoMatches
from textual.message import Message
from textual.screen import ModalScreen, Screen
from textual.widgets import Footer, Header, Static, TabbedContent, TabPane

from lmx_tui.monitor import MonitorSampler, SamplerThread, SnapshotReady
from lmx_tui.widgets.chat import ChatPane
from lmx_tui.widgets.downloads import DownloadsPane
from lmx_tui.widgets.gauges import GaugesPane
from lmx_tui.widgets.hub import HubPane
from lmx_tui.widgets.models import ModelBrowser
from lmx_tui.widgets.requests import RequestsPane
from server.errors import LmxError
from server.events import LmxEvent
from server.runner import PortInUse, ServerThread
from server.runtime import Runtime
from server.settings import ConfigStore
from server.telemetry import RequestRecord, SystemSnapshot

TABS = (
    ("models", "Models"),
    ("hub", "Hub"),
    ("downloads", "Downloads"),
    ("chat", "Chat"),
    ("monitor", "Monitor"),
    ("requests", "Requests"),
)
PANE_FOCUS = {
    "models": "#model-table",
    "chat": "#chat-input",
    "monitor": "#gauges",
    "requests": "#requests-table",
    "hub": "#hub-query",
    "downloads": "#downloads-table",
}


def styles_path() -> Path:
    """The .tcss shipped in the wheel (lmx_tui/styles), else the repository's styles/."""
    here = Path(__file__).parent / "styles" / "app.tcss"
    return here if here.exists() else Path(__file__).parent.parent / "styles" / "app.tcss"


class RuntimeEvent(Message):
    """A model was loaded, unloaded or failed to load, a download moved (from any thread)."""

    def __init__(self, event: LmxEvent) -> None:
        super().__init__()
        self.event = event


class RequestFinished(Message):
    """An API request ended (posted from the server's thread)."""

    def __init__(self, record: RequestRecord) -> None:
        super().__init__()
        self.record = record


class LogLine(Message):
    """A server log line."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text


class _PostingHandler(logging.Handler):
    def __init__(self, post: Callable[[Message], object]) -> None:
        super().__init__(logging.INFO)
        self.post = post
        self.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
        )

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.post(LogLine(self.format(record)))
        except Exception:
            self.handleError(record)


def _while_mounted(handler: Callable[[Any, Any], None]) -> Callable[[Any, Any], None]:
    """Messages posted from other threads can land while the app tears its panes down."""

    @wraps(handler)
    def guarded(self: Any, message: Any) -> None:
        with contextlib.suppress(NoMatches):
            handler(self, message)

    return guarded


class HelpScreen(ModalScreen[None]):
    """Every binding of the app and of the pane in focus."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,q,f1", "dismiss", "Close")]

    def __init__(self, rows: list[tuple[str, str]]) -> None:
        super().__init__()
        self.rows = rows

    def compose(self) -> ComposeResult:
        width = max(len(k) for k, _ in self.rows)
        text = "\n".join(f"  {k.ljust(width)}  {d}" for k, d in self.rows)
        with VerticalScroll(id="help-box"):
            yield Static(
                f"[b]lmx keys[/b]\n\n{text}\n\n  esc closes this help", id="help-text", markup=True
            )


class LmxApp(App[None]):
    """Desktop-style manager; every pane reads the one runtime the HTTP server uses."""

    TITLE = "lmx"
    CSS_PATH = styles_path()
    ENABLE_COMMAND_PALETTE = True
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("f1,question_mark", "help", "Help", id="app.help", tooltip="List every key"),
        Binding(
            "ctrl+q",
            "quit",
            "Quit",
            id="app.quit",
            tooltip="Stop the server and quit",
            priority=True,
        ),
        Binding("f2", "tab('models')", "Models", id="app.models", show=False),
        Binding("f3", "tab('chat')", "Chat", id="app.chat", show=False),
        Binding("f4", "tab('monitor')", "Monitor", id="app.monitor", show=False),
        Binding("f5", "tab('requests')", "Requests", id="app.requests", show=False),
        Binding("f6", "tab('hub')", "Hub", id="app.hub", show=False),
        Binding("f7", "tab('downloads')", "Downloads", id="app.downloads", show=False),
    ]

    def __init__(
        self,
        rt: Runtime,
        *,
        server: ServerThread | None = None,
        server_note: str = "",
        system_sampler: Callable[[], SystemSnapshot] | None = None,
        sample_interval: float = 0.5,
    ) -> None:
        super().__init__()
        self.rt = rt
        self.server = server
        self.server_note = server_note
        self._sampler = MonitorSampler(rt, system_sampler)
        self._interval = sample_interval
        self._thread: SamplerThread | None = None
        self._unsubscribe: list[Callable[[], None]] = []
        self._log_handler = _PostingHandler(self.post_message)

    # ----- layout ------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Header(show_clock=False)
        with TabbedContent(id="tabs"):
            with TabPane("Models", id="models"):
                yield ModelBrowser(id="browser")
            with TabPane("Hub", id="hub"):
                yield HubPane(self.rt, id="hub-pane")
            with TabPane("Downloads", id="downloads"):
                yield DownloadsPane(id="downloads-pane")
            with TabPane("Chat", id="chat"):
                yield ChatPane(self.rt, id="chat-pane")
            with TabPane("Monitor", id="monitor"):
                yield GaugesPane(id="gauges")
            with TabPane("Requests", id="requests"):
                yield RequestsPane(id="requests-pane")
        yield Footer()

    def on_mount(self) -> None:
        if self.server is not None:
            self.sub_title = f"serving {self.server.url}/v1"
        else:
            self.sub_title = self.server_note or "server off"
        if self.server_note:
            self.notify(self.server_note, severity="warning", timeout=10)
        self._unsubscribe.append(
            self.rt.events.subscribe(lambda ev: self.post_message(RuntimeEvent(ev)))
        )
        self._unsubscribe.append(
            self.rt.requests.subscribe(lambda rec: self.post_message(RequestFinished(rec)))
        )
        for name in ("server", "uvicorn.error"):
            logging.getLogger(name).addHandler(self._log_handler)
        self.refresh_models()
        self._thread = SamplerThread(self._sampler, self.post_message, self._interval)
        self._thread.start()
        self.query_one("#model-table").focus()

    def on_unmount(self) -> None:
        if self._thread is not None:
            self._thread.stop()
        for fn in self._unsubscribe:
            fn()
        for name in ("server", "uvicorn.error"):
            logging.getLogger(name).removeHandler(self._log_handler)

    # ----- state down ----------------------------------------------------------------------

    def refresh_models(self) -> None:
        sched = self.rt.scheduler
        models = self.rt.catalog.models()
        states = {m.id: self._state(m.id) for m in models}
        memory: dict[str, tuple[int, bool]] = {}
        for m in models:
            if m.usable:
                lm = sched.get(m.id)
                est = lm.estimate if lm else sched.estimate_for(m)
                fits = lm is not None or sched.plan(est, exclude=m.id).fits
                memory[m.id] = (est.total, fits)
        self.query_one(ModelBrowser).show(models, states, memory)
        self.query_one(ChatPane).set_models([m.id for m in models if m.usable])

    def _state(self, model_id: str, live: str | None = None) -> str:
        state = live or self.rt.scheduler.state_of(model_id)
        return f"{state} (pinned)" if self.rt.scheduler.is_pinned(model_id) else state

    @_while_mounted
    def on_runtime_event(self, message: RuntimeEvent) -> None:
        ev = message.event
        if ev.kind.startswith("download_"):
            self.query_one(DownloadsPane).show(self.rt.downloads.list())
            if ev.kind == "download_done":
                self.refresh_models()
                self.notify(f"downloaded {ev.model}")
            elif ev.kind == "download_failed":
                self.notify(f"{ev.model}: {ev.detail.get('error')}", severity="error")
            return
        if ev.kind == "loading":
            models = self.rt.catalog.models()
            states = {m.id: self._state(m.id) for m in models}
            states[ev.model] = self._state(ev.model, "loading")
            self.query_one(ModelBrowser).show(models, states)
            return
        if ev.kind == "load_failed":
            self.notify(f"{ev.model}: {ev.detail.get('error')}", severity="error")
        self.refresh_models()

    @_while_mounted
    def on_snapshot_ready(self, message: SnapshotReady) -> None:
        with self.batch_update():
            self.query_one(GaugesPane).apply(message.snapshot)
            busy = {m.model: self._state(m.model, m.state) for m in message.snapshot.models}
            browser = self.query_one(ModelBrowser)
            if busy != {k: v for k, v in browser.states.items() if k in busy}:
                browser.show(browser.models, {**browser.states, **busy})

    @_while_mounted
    def on_request_finished(self, message: RequestFinished) -> None:
        self.query_one(RequestsPane).add(message.record)

    @_while_mounted
    def on_log_line(self, message: LogLine) -> None:
        self.query_one(RequestsPane).log_line(message.text)

    # ----- intents up ----------------------------------------------------------------------

    def on_model_browser_load(self, message: ModelBrowser.Load) -> None:
        self.run_worker(self._load(message.model_id), group="models")

    async def _load(self, model_id: str) -> None:
        try:
            info = self.rt.catalog.resolve(model_id)
            lm = await asyncio.to_thread(self.rt.scheduler.load, info)
        except LmxError as e:
            self.notify(e.message, severity="error")
            return
        self.notify(f"loaded {lm.info.id} in {lm.load_seconds:.1f}s")

    def on_model_browser_unload(self, message: ModelBrowser.Unload) -> None:
        self.run_worker(self._unload(message.model_id), group="models")

    async def _unload(self, model_id: str) -> None:
        if await asyncio.to_thread(self.rt.scheduler.unload, model_id):
            self.notify(f"unloaded {model_id}")
        else:
            self.notify(f"{model_id} is not loaded", severity="warning")

    def on_hub_pane_pull(self, message: HubPane.Pull) -> None:
        self.run_worker(self._pull(message.repo, message.file), group="downloads")

    async def _pull(self, repo: str, file: str) -> None:
        try:
            jobs = await asyncio.to_thread(self.rt.pull, repo, None, file)
        except LmxError as e:
            self.notify(e.message, severity="error")
            return
        self.query_one(DownloadsPane).show(self.rt.downloads.list())
        self.notify(f"downloading {len(jobs)} file(s) from {repo} (F7)")

    def on_downloads_pane_act(self, message: DownloadsPane.Act) -> None:
        queue = self.rt.downloads
        action = {"cancel": queue.cancel, "pause": queue.pause, "resume": queue.resume}
        action[message.action](message.job_id)
        self.query_one(DownloadsPane).show(queue.list())

    def on_model_browser_pin(self, message: ModelBrowser.Pin) -> None:
        pinned = self.rt.scheduler.is_pinned(message.model_id)
        self.rt.scheduler.pin(message.model_id, not pinned)
        self.notify(f"{'unpinned' if pinned else 'pinned'} {message.model_id}")

    def on_model_browser_rescan(self, message: ModelBrowser.Rescan) -> None:
        self.run_worker(self._rescan(), group="models")

    async def _rescan(self) -> None:
        found = await asyncio.to_thread(self.rt.catalog.refresh)
        self.refresh_models()
        self.notify(f"{len(found)} models found")

    # ----- actions -------------------------------------------------------------------------

    def action_tab(self, tab: str) -> None:
        self.query_one(TabbedContent).active = tab
        self._focus_pane(tab)

    def on_tabbed_content_tab_activated(self, event: TabbedContent.TabActivated) -> None:
        if event.pane.id:
            self._focus_pane(event.pane.id)

    def _focus_pane(self, tab: str) -> None:
        # Focus must follow the tab: left on a hidden widget, it would pull its tab back.
        target = PANE_FOCUS.get(tab)
        if target:
            self.set_focus(self.query_one(target))

    def action_help(self) -> None:
        rows: list[tuple[str, str]] = []
        seen = set()
        focused = self.screen.focused
        # Outermost first: the pane's meaning of a key wins over the inner widget's.
        chain = list(reversed(focused.ancestors_with_self)) if focused else [self]
        for node in chain:
            for b in getattr(node, "BINDINGS", []):
                if isinstance(b, Binding) and b.description and b.key not in seen:
                    seen.add(b.key)
                    keys = ", ".join(
                        self.get_key_display(replace(b, key=k.strip())) for k in b.key.split(",")
                    )
                    rows.append((keys, b.description))
        rows.append(("^p", "Command palette: every action"))
        self.push_screen(HelpScreen(rows))

    def get_system_commands(self, screen: Screen[Any]) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for tab_id, title in TABS:
            yield SystemCommand(
                f"Show {title}", f"Switch to the {title} tab", lambda t=tab_id: self.action_tab(t)
            )  # type: ignore[misc]
        yield SystemCommand("Help", "List every key", self.action_help)
        yield SystemCommand(
            "Rescan models",
            "Look for models again",
            lambda: self.run_worker(self._rescan(), group="models"),
        )
        for m in self.rt.catalog.models():
            if not m.usable:
                continue
            yield SystemCommand(
                f"Load {m.id}",
                f"{m.architecture} · {m.quantization}",
                lambda i=m.id: self.run_worker(self._load(i), group="models"),
            )
        for lm in self.rt.scheduler.loaded():
            yield SystemCommand(
                f"Unload {lm.info.id}",
                "free its memory",
                lambda i=lm.info.id: self.run_worker(self._unload(i), group="models"),
            )


def start_server(rt: Runtime) -> tuple[ServerThread | None, str]:
    """The embedded server, or why it is off (shown in the UI, never a traceback)."""
    refusal = rt.settings.bind_refusal()
    if refusal:
        return None, f"server off: {refusal}"
    try:
        return ServerThread(rt).start(), ""
    except (PortInUse, RuntimeError) as e:
        return None, f"server off: {e}"


def run_tui(config: ConfigStore, *, serve: bool = True) -> None:
    """`lmx`: the app on the main thread, the HTTP server on a worker thread."""
    rt = Runtime(config)
    rt.watch_config()
    server, note = start_server(rt) if serve else (None, "server off")
    try:
        LmxApp(rt, server=server, server_note=note).run()
    finally:
        if server is not None:
            server.stop()
        rt.close()
