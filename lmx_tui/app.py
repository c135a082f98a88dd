"""The lmx terminal app: model browser, chat, gauges and requests over the embedded server."""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
from collections.abc import Callable, Iterable
from dataclasses import replace
from functools import wraps
from pathlib import Path
from typing import Any, ClassVar

from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding, BindingType
from textual.css.query import NoMatches
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Header, TabbedContent, TabPane

from lmx_tui.logs import LogPosted, LogRouting, PostingHandler
from lmx_tui.monitor import MonitorSampler, SamplerThread, SnapshotReady
from lmx_tui.widgets.budget import BudgetBar
from lmx_tui.widgets.chat import ChatPane
from lmx_tui.widgets.downloads import DownloadsPane
from lmx_tui.widgets.gauges import GaugesPane
from lmx_tui.widgets.help import HelpScreen
from lmx_tui.widgets.hub import HubPane, PulledPrompt
from lmx_tui.widgets.load_prompt import LoadPrompt
from lmx_tui.widgets.models import ModelBrowser
from lmx_tui.widgets.requests import RequestDetailScreen, RequestsPane
from server.errors import LmxError
from server.events import LmxEvent
from server.runner import PortInUse, ServerThread
from server.runtime import Runtime
from server.settings import ConfigStore, state_dir
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


class SettingsChanged(Message):
    """The settings changed (a reload, or an option chosen here): budgets and fits move."""


class RequestFinished(Message):
    """An API request ended (posted from the server's thread)."""

    def __init__(self, record: RequestRecord) -> None:
        super().__init__()
        self.record = record


def _while_mounted(handler: Callable[[Any, Any], None]) -> Callable[[Any, Any], None]:
    """Messages posted from other threads can land while the app tears its panes down."""

    @wraps(handler)
    def guarded(self: Any, message: Any) -> None:
        with contextlib.suppress(NoMatches):
            handler(self, message)

    return guarded


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
        log_handler: PostingHandler | None = None,
    ) -> None:
        super().__init__()
        self.rt = rt
        self.server = server
        self.server_note = server_note
        self._sampler = MonitorSampler(rt, system_sampler)
        self._interval = sample_interval
        self._thread: SamplerThread | None = None
        self._unsubscribe: list[Callable[[], None]] = []
        # run_tui routes the logs before anything starts; an app built alone (tests) here.
        self._log_handler = log_handler or PostingHandler()
        self._routing = None if log_handler else LogRouting(self._log_handler, None)
        self._pulls: dict[str, str] = {}  # download id -> repository, for the Hub's status

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
        self._unsubscribe.append(
            self.rt.config.subscribe(lambda old, new: self.post_message(SettingsChanged()))
        )
        if self._routing is not None:
            self._routing.open()
        self._log_handler.attach(self.post_message)
        self.refresh_models()
        self._thread = SamplerThread(self._sampler, self.post_message, self._interval)
        self._thread.start()
        self.query_one("#model-table").focus()

    def on_unmount(self) -> None:
        if self._thread is not None:
            self._thread.stop()
        for fn in self._unsubscribe:
            fn()
        self._log_handler.attach(None)
        if self._routing is not None:
            self._routing.close()

    # ----- state down ----------------------------------------------------------------------

    def refresh_models(self) -> None:
        models = self.rt.models.models()
        described = {d["id"]: d for d in self.rt.models.describe_all()}
        states = {m.id: self._state(m.id) for m in models}
        memory: dict[str, tuple[int, bool]] = {
            i: (d["memory_estimate"]["total"], d["fits"])
            for i, d in described.items()
            if "memory_estimate" in d
        }
        self.query_one(ModelBrowser).show(models, states, memory)
        self.query_one(ChatPane).set_models([m.id for m in models if m.usable])

    def _state(self, model_id: str, live: str | None = None) -> str:
        state = live or self.rt.scheduler.state_of(model_id)
        return f"{state} (pinned)" if self.rt.scheduler.is_pinned(model_id) else state

    @_while_mounted
    def on_runtime_event(self, message: RuntimeEvent) -> None:
        ev = message.event
        if ev.kind.startswith("download_"):
            downloads = self.rt.downloads.list()
            self.query_one(DownloadsPane).show(downloads)
            job = next((d for d in downloads if d.id == ev.detail.get("id")), None)
            if job is not None and job.id in self._pulls:
                self.query_one(HubPane).show_download(job)
            if ev.kind == "download_done":
                self.refresh_models()
                repo = self._pulls.pop(str(ev.detail.get("id")), None)
                if repo is not None and job is not None:
                    self._offer(repo, job.filename)
                else:
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

    def _offer(self, repo: str, filename: str) -> None:
        """A pull from the Hub finished: offer to load it and chat."""
        try:
            info = self.rt.catalog.resolve(f"{repo}/{filename.removesuffix('.gguf')}".lower())
        except LmxError:
            self.notify(f"downloaded {filename}")
            return

        def chosen(choice: str | None) -> None:
            if choice == "load":
                self.ask_load(info.id)
            elif choice == "chat":
                self.action_tab("chat")
                self.query_one(ChatPane).choose(info.id)

        self.push_screen(PulledPrompt(info.id), chosen)

    @_while_mounted
    def on_snapshot_ready(self, message: SnapshotReady) -> None:
        with self.batch_update():
            self.query_one(GaugesPane).apply(message.snapshot)
            self.query_one("#models-budget", BudgetBar).apply(message.snapshot.memory)
            self.query_one(RequestsPane).show_in_flight(message.snapshot.requests)
            busy = {m.model: self._state(m.model, m.state) for m in message.snapshot.models}
            browser = self.query_one(ModelBrowser)
            if busy != {k: v for k, v in browser.states.items() if k in busy}:
                browser.show(browser.models, {**browser.states, **busy})

    @_while_mounted
    def on_settings_changed(self, message: SettingsChanged) -> None:
        self.refresh_models()

    @_while_mounted
    def on_request_finished(self, message: RequestFinished) -> None:
        self.query_one(RequestsPane).add(message.record)

    @_while_mounted
    def on_log_posted(self, message: LogPosted) -> None:
        self.query_one(RequestsPane).log_entry(message.entry)

    # ----- intents up ----------------------------------------------------------------------

    def on_model_browser_load(self, message: ModelBrowser.Load) -> None:
        self.ask_load(message.model_id)

    def ask_load(self, model_id: str) -> None:
        """Load, after asking when it would evict, wait, or cannot fit."""
        self.run_worker(self._ask_load(model_id), group="models")

    async def _ask_load(self, model_id: str) -> None:
        models = self.rt.models
        try:
            preview, note = await asyncio.to_thread(models.preview, model_id, ask_hub=True)
        except LmxError as e:
            self.notify(e.message, severity="error")
            return
        if preview.loaded:
            self.notify(f"{model_id} is already loaded")
            return
        if preview.fits and not preview.victims:
            await self._load(model_id)
            return
        sizes = {}
        for other in (*preview.victims, *preview.blocked_by):
            lm = self.rt.scheduler.get(other)
            sizes[other] = lm.estimate.total if lm else 0
        choice = await self.push_screen_wait(LoadPrompt(preview, sizes, note))
        if choice == "load":
            await self._load(model_id)
        elif choice and choice.startswith("option:"):
            option = preview.options[int(choice.split(":")[1])]
            if option.kind == "quantization" and option.repo and option.file:
                await self._pull(option.repo, option.file)
                return
            models.apply_option(model_id, option)
            self.notify(f"{model_id}: ctx {option.ctx}, {option.parallel} slot(s) from now on")
            await self._ask_load(model_id)

    async def _load(self, model_id: str) -> None:
        try:
            lm = await asyncio.to_thread(self.rt.models.load, model_id)
        except LmxError as e:
            self.notify(e.message, severity="error")
            return
        self.notify(f"loaded {lm.info.id} in {lm.load_seconds:.1f}s")

    def on_model_browser_unload(self, message: ModelBrowser.Unload) -> None:
        self.run_worker(self._unload(message.model_id), group="models")

    async def _unload(self, model_id: str) -> None:
        if await asyncio.to_thread(self.rt.models.unload, model_id):
            self.notify(f"unloaded {model_id}")
        else:
            self.notify(f"{model_id} is not loaded", severity="warning")

    def on_hub_pane_pull(self, message: HubPane.Pull) -> None:
        self.run_worker(self._pull(message.repo, message.file), group="downloads")

    async def _pull(self, repo: str, file: str) -> None:
        try:
            jobs = await asyncio.to_thread(self.rt.models.pull, repo, None, file)
        except LmxError as e:
            self.notify(e.message, severity="error")
            return
        for j in jobs:
            self._pulls[j.id] = repo
        self.query_one(DownloadsPane).show(self.rt.downloads.list())
        self.query_one(HubPane).show_download(jobs[0])

    def on_downloads_pane_act(self, message: DownloadsPane.Act) -> None:
        queue = self.rt.downloads
        action = {"cancel": queue.cancel, "pause": queue.pause, "resume": queue.resume}
        action[message.action](message.job_id)
        self.query_one(DownloadsPane).show(queue.list())

    def on_model_browser_pin(self, message: ModelBrowser.Pin) -> None:
        pinned = self.rt.models.is_pinned(message.model_id)
        self.rt.models.pin(message.model_id, not pinned)
        self.notify(f"{'unpinned' if pinned else 'pinned'} {message.model_id}")
        self.refresh_models()

    def on_requests_pane_cancel(self, message: RequestsPane.Cancel) -> None:
        if self.rt.service.cancel(message.request_id):
            self.notify(f"cancelled {message.request_id}")
        else:
            self.notify(f"{message.request_id} is no longer running", severity="warning")

    def on_requests_pane_detail(self, message: RequestsPane.Detail) -> None:
        rec = message.record
        self.push_screen(RequestDetailScreen(rec, self.rt.requests.detail(rec.id)))

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
        # A late event for a tab no longer active (the first tab's, when a key switched tabs
        # while the app was still starting) must not take the focus back from the user.
        if event.pane.id and event.pane.id == event.tabbed_content.active:
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
        # Textual's "Keys" panel would be a second, lesser help: F1's lists every key.
        yield from (c for c in super().get_system_commands(screen) if c.title != "Keys")
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
                lambda i=m.id: self.ask_load(i),
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


def log_file() -> Path:
    """Where the app's log goes while it runs (the screen has the log pane)."""
    return state_dir() / "lmx.log"


def run_tui(config: ConfigStore, *, serve: bool = True) -> int:
    """`lmx`: the app on the main thread, the HTTP server on a worker thread. Every log
    record goes to the log pane and the log file, from before anything starts until the end.
    Returns the exit status: non-zero when the app crashed."""
    handler = PostingHandler()
    with LogRouting(handler, log_file()) as routing, open(log_file(), "a") as crash_log:
        # A native crash (a model library's) writes every thread's Python stack to the log
        # file: the screen is gone by then, and the exit status stays the signal's.
        faulthandler.enable(crash_log, all_threads=True)
        rt = Runtime(config)
        rt.watch_config()
        server, note = start_server(rt) if serve else (None, "server off")
        routing.sweep()  # the HTTP app (Litestar) configured logging of its own
        app = LmxApp(rt, server=server, server_note=note, log_handler=handler)
        try:
            app.run()
        finally:
            if server is not None:
                server.stop()
            rt.close()
            faulthandler.disable()
    return app.return_code or 0
