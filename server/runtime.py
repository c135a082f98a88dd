"""Everything a running lmx holds, wired together once: config, catalog, scheduler, the
generation service (the data plane), the model service (the control plane), downloads, the
request log and the event bus. Each part can also be built alone (tests do)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from server.catalog import Catalog
from server.downloads import Download, DownloadQueue
from server.engines import EngineFactory, create_engine
from server.engines.prefix_store import PrefixStore
from server.events import EventBus
from server.gpus import GpuInventory
from server.keys import KeyStore
from server.memory import default_budget, prompt_cache_ram
from server.models import ModelService
from server.pipeline import GenerationService
from server.scheduler import Clock, Scheduler
from server.settings import (
    ConfigError,
    ConfigStore,
    Settings,
    hf_cache_dir,
    prompt_cache_dir,
    state_dir,
)
from server.telemetry import RequestLog
from server.upstreams import Upstreams

log = logging.getLogger(__name__)


class Runtime:
    """The process's parts, built and closed together; the API server, the TUI and the CLI
    share one."""

    def __init__(
        self,
        config: ConfigStore | Settings,
        *,
        engine_factory: EngineFactory = create_engine,
        clock: Clock | None = None,
        gpus: GpuInventory | None = None,
        gpu_offload: Callable[[], bool] | None = None,
    ) -> None:
        self.config = config if isinstance(config, ConfigStore) else ConfigStore.fixed(config)
        self.events = EventBus()
        self.keys = KeyStore(self.config)  # a bad key file fails here, before anything loads
        self.requests = RequestLog()
        # Other OpenAI-compatible servers whose models lmx serves; probed in the background.
        self.upstreams = Upstreams(self.config, self.events)
        self.catalog = Catalog(self.config, sources=[self.upstreams.models])
        self.upstreams.watch(lambda: self.catalog.refresh(files=False))
        # One prompt cache for the process, handed to every engine through its options: what
        # a model's slots held outlives its unload (RAM within the budget, then disk). The
        # scheduler sets its RAM cap to what loaded models leave of the budget.
        s = self.settings
        self.prefix_store = PrefixStore(
            prompt_cache_ram(s.max_memory or default_budget(), s.prompt_cache_ram),
            prompt_cache_dir(s),
            s.prompt_cache_disk,
        )
        self.scheduler = Scheduler(
            self.config,
            self.catalog,
            self.events,
            engine_factory=engine_factory,
            clock=clock,
            prefix_store=self.prefix_store,
            gpus=gpus,
            gpu_offload=gpu_offload,
        )
        self.catalog.in_use = lambda model_id: self.scheduler.get(model_id) is not None
        self.service = GenerationService(self.catalog, self.scheduler, self.requests)
        self.models = ModelService(
            self.config, self.catalog, self.scheduler, self.events, lambda: self.downloads
        )
        self._downloads: DownloadQueue | None = None
        self._lock = threading.Lock()
        self._closed = threading.Event()

    @property
    def settings(self) -> Settings:
        return self.config.current

    # ----- downloads ---------------------------------------------------------------------

    @property
    def downloads(self) -> DownloadQueue:
        """The download queue (created on first use; it resumes what a restart interrupted)."""
        with self._lock:
            if self._downloads is None:
                self._downloads = DownloadQueue(
                    hf_cache_dir(self.settings),
                    state_dir() / "downloads.json",
                    concurrency=self.settings.download_concurrency,
                    on_event=lambda kind, d: self.events.publish(
                        f"download_{kind}", d.filename, **d.as_dict()
                    ),
                    on_installed=self._installed,
                )
                self._downloads.start()
            return self._downloads

    def _installed(self, d: Download) -> None:
        self.catalog.refresh()  # verified and in place: a model before the job says done

    # ----- config --------------------------------------------------------------------------

    def reload_config(self) -> bool:
        """Re-read the config file; a bad file is logged (not raised) and the old one stays."""
        try:
            new, changed = self.config.reload()
        except ConfigError as e:
            log.error("config not reloaded, the old one stays: %s", e)
            self.events.publish("config_error", "", error=str(e))
            return False
        if changed & {"model_dirs", "hf_cache", "user_stores"}:
            self.catalog.refresh()
        log.info("reloaded %s", new.config_path)
        self.events.publish(
            "config_reloaded", "", path=str(new.config_path), changed=sorted(changed)
        )
        return True

    def watch_config(self, interval: float = 1.0) -> None:
        """Reload the config file whenever it changes (a thread; stops with close())."""
        path = self.config.path
        if path is None:
            return

        def mtime() -> float:
            try:
                return path.stat().st_mtime
            except OSError:
                return 0.0

        def loop() -> None:
            seen = mtime()
            while not self._closed.wait(interval):
                now = mtime()
                if now != seen:
                    seen = now
                    self.reload_config()

        threading.Thread(target=loop, name="lmx-config-watch", daemon=True).start()

    def close(self) -> None:
        """Unload everything and stop background work."""
        self._closed.set()
        with self._lock:
            downloads = self._downloads
        if downloads is not None:
            downloads.close()
        self.scheduler.close()  # unloading puts the slots' prefixes in the prompt cache
        self.prefix_store.close()  # what is only in RAM goes to disk, for a bounded time
        self.upstreams.close()
