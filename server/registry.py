"""The single source of truth: available models, loaded instances, and events about both."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.discovery import ModelInfo, discover, resolve_name
from server.downloads import Download, DownloadQueue
from server.engines import Engine, create_engine
from server.engines.base import EngineOptions
from server.errors import (
    EngineFailure,
    InvalidRequest,
    LmxError,
    ModelNotFound,
    ModelsBusy,
    ModelTooLarge,
    ModelUnusable,
)
from server.memory import (
    MemoryEstimate,
    baseline_rss,
    default_budget,
    estimate_model,
    process_rss,
)
from server.settings import (
    ConfigError,
    PresetConfig,
    Settings,
    hf_cache_dir,
    parse_duration,
    read_config,
    state_dir,
)
from server.telemetry import RequestLog

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegistryEvent:
    """Something happened to a model: kind is loading, loaded, unloaded, load_failed."""

    kind: str
    model: str
    at: float = field(default_factory=time.time)
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoadedModel:
    """One loaded instance and its state."""

    info: ModelInfo
    engine: Engine
    estimate: MemoryEstimate
    state: str = "ready"  # loading -> ready -> unloading
    loaded_at: float = field(default_factory=time.time)
    load_seconds: float = 0.0
    measured: int = 0  # RSS growth across the load, bytes
    in_use: int = 0  # requests holding it (never evicted while > 0)
    last_used: float = field(default_factory=time.monotonic)
    expires_at: float | None = None  # monotonic; None: kept until evicted or unloaded

    @property
    def idle(self) -> bool:
        st = self.engine.stats()
        return self.in_use == 0 and st["slots_busy"] == 0 and st["queue_depth"] == 0

    def expires_in(self) -> float | None:
        return None if self.expires_at is None else max(0.0, self.expires_at - time.monotonic())


Listener = Callable[[RegistryEvent], None]


class Registry:
    """Knows every available model and every loaded one; loads on demand. Thread-safe."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.RLock()
        self._models: dict[str, ModelInfo] = {}
        self._loaded: dict[str, LoadedModel] = {}
        self._loading: dict[str, threading.Event] = {}
        self._listeners: list[Listener] = []
        self._admission = threading.Lock()  # one load (and its evictions) at a time
        self._closed = threading.Event()
        self._reaper: threading.Thread | None = None
        self.requests = RequestLog()
        self.budget = settings.max_memory or default_budget()
        self._pins: set[str] = set()
        self._downloads: DownloadQueue | None = None
        self.refresh()

    # ----- catalogue -----------------------------------------------------------------------

    def refresh(self) -> list[ModelInfo]:
        """Rescan every source; loaded models stay loaded."""
        s = self.settings
        found = discover(
            s.model_dirs,
            include_default=s.include_default_model,
            include_hf_cache=s.include_hf_cache,
            hf_cache_dir=s.hf_cache_dir,
            include_user_stores=s.include_user_stores,
            ollama_dir=s.ollama_dir,
            lmstudio=s.lmstudio_dirs,
        )
        with self._lock:
            self._models = {m.id: m for m in found}
        return found

    def models(self) -> list[ModelInfo]:
        with self._lock:
            return list(self._models.values())

    def resolve(self, name: str) -> ModelInfo:
        """The model a user-supplied name refers to, or ModelNotFound."""
        with self._lock:
            models = dict(self._models)
        name = self.settings.aliases.get(name.strip().lower(), name)
        try:
            m = resolve_name(name, models)
        except LookupError as e:
            raise InvalidRequest(str(e), param="model") from e
        if m is None:
            raise ModelNotFound(name)
        return m

    # ----- loading -------------------------------------------------------------------------

    def loaded(self) -> list[LoadedModel]:
        with self._lock:
            return list(self._loaded.values())

    def get_loaded(self, model_id: str) -> LoadedModel | None:
        with self._lock:
            return self._loaded.get(model_id)

    def engine_options(self, info: ModelInfo) -> EngineOptions:
        s = self.settings
        mc = s.models.get(info.id)
        return EngineOptions(
            n_ctx=(mc.ctx if mc and mc.ctx else s.ctx),
            parallel=(mc.parallel if mc and mc.parallel else s.parallel),
            threads=s.threads,
            gpu_layers=(mc.gpu_layers if mc and mc.gpu_layers is not None else s.gpu_layers),
            max_queue=s.max_queue,
            chat_template=mc.chat_template if mc else None,
        )

    def ensure_loaded(self, name: str) -> LoadedModel:
        """Return the loaded instance, loading it first if needed (blocking)."""
        info = self.resolve(name)
        if not info.usable:
            raise ModelUnusable(
                f"The model '{info.id}' cannot be loaded: {info.error}", param="model"
            )
        while True:
            with self._lock:
                lm = self._loaded.get(info.id)
                if lm is not None and lm.state == "ready":
                    return lm
                waiter = self._loading.get(info.id)
                if waiter is None:
                    waiter = threading.Event()
                    self._loading[info.id] = waiter
                    break
            waiter.wait()
        try:
            est = self.estimate_for(info)
            with self._admission:
                self._make_room(info, est)
                self._publish(RegistryEvent("loading", info.id, detail=est.as_dict()))
                t0 = time.perf_counter()
                rss0 = baseline_rss()
                engine = create_engine(info, self.engine_options(info))
                try:
                    engine.load()
                except EngineFailure as e:
                    self._publish(RegistryEvent("load_failed", info.id, detail={"error": str(e)}))
                    raise
                lm = LoadedModel(
                    info,
                    engine,
                    est,
                    load_seconds=time.perf_counter() - t0,
                    measured=max(0, process_rss() - rss0),
                )
                lm.expires_at = self._deadline(self.keep_alive_for(info.id))
                with self._lock:
                    self._loaded[info.id] = lm
            self._start_reaper()
            log.info("loaded %s in %.2fs", info.id, lm.load_seconds)
            self._publish(
                RegistryEvent("loaded", info.id, detail={"seconds": round(lm.load_seconds, 3)})
            )
            return lm
        finally:
            with self._lock:
                self._loading.pop(info.id, None)
            waiter.set()

    # ----- memory and eviction ---------------------------------------------------------------

    def estimate_for(
        self, info: ModelInfo, ctx: int | None = None, parallel: int | None = None
    ) -> MemoryEstimate:
        if info.header is None and info.mlx is None:
            raise ModelUnusable(
                f"The model '{info.id}' cannot be loaded: {info.error}", param="model"
            )
        opts = self.engine_options(info)
        return estimate_model(info, ctx or opts.n_ctx, parallel or opts.parallel)

    def plan(self, need: int, exclude: str = "") -> tuple[bool, list[str]]:
        """Whether `need` bytes fit now, and the idle models (LRU first) evicted to make room."""
        with self._lock:
            loaded = [lm for lm in self._loaded.values() if lm.info.id != exclude]
        used = sum(lm.estimate.total for lm in loaded)
        count = len(loaded)
        cap = self.settings.max_loaded_models
        victims: list[str] = []
        idle = (lm for lm in loaded if lm.idle and not self.is_pinned(lm.info.id))
        for lm in sorted(idle, key=lambda lm: lm.last_used):
            if used + need <= self.budget and not (cap and count + 1 > cap):
                break
            victims.append(lm.info.id)
            used -= lm.estimate.total
            count -= 1
        fits = used + need <= self.budget and not (cap and count + 1 > cap)
        return fits, victims

    def _make_room(self, info: ModelInfo, est: MemoryEstimate) -> None:
        if est.total > self.budget:
            raise ModelTooLarge(
                f"The model '{info.id}' needs about {est.total / 1e6:.0f} MB (weights "
                f"{est.weights / 1e6:.0f} MB, KV cache {est.kv_cache / 1e6:.0f} MB, compute "
                f"{est.compute / 1e6:.0f} MB) but the memory budget is "
                f"{self.budget / 1e6:.0f} MB; lower ctx/parallel or raise --max-memory.",
                param="model",
            )
        deadline = time.monotonic() + self.settings.load_timeout
        while True:
            rivals = self.group_rivals(info.id)
            if rivals and all(lm.idle for lm in rivals):
                for lm in rivals:
                    self._unload_id(lm.info.id, reason="evicted")
                continue
            fits, victims = self.plan(est.total, exclude=info.id)
            if fits and not rivals:
                for v in victims:
                    self._unload_id(v, reason="evicted")
                return
            if time.monotonic() >= deadline:
                raise ModelsBusy(
                    f"No room for '{info.id}' ({est.total / 1e6:.0f} MB): the loaded models "
                    f"are serving requests and none finished within "
                    f"{self.settings.load_timeout:.0f}s. Retry later.",
                    param="model",
                )
            time.sleep(0.05)

    # ----- downloads ------------------------------------------------------------------------------

    @property
    def downloads(self) -> DownloadQueue:
        """The download queue (created on first use; it resumes what a restart interrupted)."""
        with self._lock:
            if self._downloads is None:
                self._downloads = DownloadQueue(
                    hf_cache_dir(self.settings),
                    state_dir() / "downloads.json",
                    concurrency=self.settings.download_concurrency,
                    on_event=self._on_download,
                    on_installed=self._on_installed,
                )
                self._downloads.start()
            return self._downloads

    def pull(self, repo: str, quant: str | None = None, file: str | None = None) -> list[Download]:
        """Queue every file of the model `repo[:quant]` or `file` names (the recommended
        quantization when neither is given)."""
        from server import hub

        listing = hub.listing(repo, self.budget)
        try:
            choice = hub.pick(listing, quant, file)
        except ValueError as e:
            raise InvalidRequest(str(e), param="quant" if quant else "file") from e
        missing = [f for f in choice.files if f not in choice.sha256]
        if missing:
            raise InvalidRequest(
                f"the hub gives no sha256 for {missing[0]}; lmx only installs files it can verify",
                param="file",
            )
        return [
            self.downloads.add(repo, f, choice.sha256[f], choice.sizes[f], listing["commit"])
            for f in choice.files
        ]

    def _on_installed(self, d: Download) -> None:
        self.refresh()  # verified and in place: a model before anyone sees the job as done

    def _on_download(self, kind: str, d: Download) -> None:
        self._publish(RegistryEvent(f"download_{kind}", d.filename, detail=d.as_dict()))

    def remove(self, name: str) -> Path:
        """Delete a model lmx manages (the Hugging Face cache): its snapshot link and blob."""
        info = self.resolve(name)
        if info.source != "hf-cache":
            raise InvalidRequest(
                f"'{info.id}' is used in place from {info.source} ({info.path}); lmx only "
                "removes models in the Hugging Face cache. Delete the file yourself.",
                param="model",
            )
        self._unload_id(info.id)
        link = info.path
        blob = link.resolve()
        link.unlink(missing_ok=True)
        repo_dir = link
        while repo_dir.parent.name != "snapshots" and repo_dir != repo_dir.parent:
            repo_dir = repo_dir.parent
        blobs_dir = repo_dir.parent.parent / "blobs"
        users = [
            p for p in repo_dir.parent.parent.rglob("*") if p.is_symlink() and p.resolve() == blob
        ]
        if blob.parent == blobs_dir and not users:
            blob.unlink(missing_ok=True)
        self.refresh()
        self._publish(RegistryEvent("removed", info.id, detail={"path": str(link)}))
        return link

    # ----- pins, groups, presets, config ---------------------------------------------------------

    def is_pinned(self, model_id: str) -> bool:
        mc = self.settings.models.get(model_id)
        return model_id in self._pins or bool(mc and mc.pin)

    def pin(self, name: str, on: bool = True) -> str:
        """Pinned models are never evicted and never expire."""
        info = self.resolve(name)
        with self._lock:
            if on:
                self._pins.add(info.id)
            else:
                self._pins.discard(info.id)
        self._publish(RegistryEvent("pinned" if on else "unpinned", info.id))
        return info.id

    def group_of(self, model_id: str) -> tuple[str, set[str]] | None:
        """The group a model belongs to and its members' ids."""
        for name, g in self.settings.groups.items():
            ids = set()
            for member in g.members:
                try:
                    ids.add(self.resolve(member).id)
                except LmxError:
                    continue
            if model_id in ids:
                return name, ids
        return None

    def group_rivals(self, model_id: str) -> list[LoadedModel]:
        """Loaded members of other groups, which an exclusive group's member unloads."""
        mine = self.group_of(model_id)
        if mine is None or not self.settings.groups[mine[0]].exclusive:
            return []
        out = []
        for lm in self.loaded():
            other = self.group_of(lm.info.id)
            if other is not None and other[0] != mine[0] and not self.is_pinned(lm.info.id):
                out.append(lm)
        return out

    def preset(self, name: str) -> PresetConfig | None:
        return self.settings.presets.get(name.strip().lower())

    def reload_config(self) -> None:
        """Re-read the config file: per-model settings, aliases, groups, presets, keep_alive.
        Requests in flight go on; a bad file raises ConfigError and the old config stays."""
        path = self.settings.config_path
        if path is None:
            return
        cf = read_config(path)
        self.settings.apply_model_sections(cf)
        log.info("reloaded %s", path)
        self._publish(RegistryEvent("config_reloaded", "", detail={"path": str(path)}))

    def watch_config(self, interval: float = 1.0) -> None:
        """Reload the config file whenever it changes (a thread; stops with close())."""
        path = self.settings.config_path
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
                    self.try_reload()

        threading.Thread(target=loop, name="lmx-config-watch", daemon=True).start()

    def try_reload(self) -> bool:
        """Reload, logging (not raising) a bad file: the old config stays in force."""
        try:
            self.reload_config()
            return True
        except ConfigError as e:
            log.error("config not reloaded, the old one stays: %s", e)
            self._publish(RegistryEvent("config_error", "", detail={"error": str(e)}))
            return False

    # ----- leases and keep_alive ---------------------------------------------------------------

    def keep_alive_for(self, model_id: str) -> float:
        mc = self.settings.models.get(model_id)
        if mc is not None and mc.keep_alive is not None:
            return parse_duration(mc.keep_alive)
        return self.settings.keep_alive

    @staticmethod
    def _deadline(keep_alive: float) -> float | None:
        return None if keep_alive < 0 else time.monotonic() + keep_alive

    def acquire(self, name: str) -> LoadedModel:
        """Load if needed and hold the model for one request (it cannot be evicted)."""
        while True:
            lm = self.ensure_loaded(name)
            with self._lock:
                if self._loaded.get(lm.info.id) is lm:  # not unloaded in between
                    lm.in_use += 1
                    lm.expires_at = None
                    return lm

    def release(self, lm: LoadedModel, keep_alive: float | None = None) -> None:
        """The request is over: start the keep_alive countdown (0 unloads now)."""
        ka = self.keep_alive_for(lm.info.id) if keep_alive is None else keep_alive
        with self._lock:
            lm.in_use = max(0, lm.in_use - 1)
            lm.last_used = time.monotonic()
            if lm.in_use == 0:
                lm.expires_at = self._deadline(ka)
        self._start_reaper()

    def _start_reaper(self) -> None:
        with self._lock:
            if self._reaper is None and not self._closed.is_set():
                self._reaper = threading.Thread(
                    target=self._reap, name="lmx-keepalive", daemon=True
                )
                self._reaper.start()

    def _reap(self) -> None:
        while not self._closed.wait(0.2):
            now = time.monotonic()
            for lm in self.loaded():
                if self.is_pinned(lm.info.id):
                    continue
                if lm.expires_at is not None and lm.expires_at <= now and lm.idle:
                    with self._admission:
                        if lm.expires_at is not None and lm.expires_at <= now and lm.idle:
                            self._unload_id(lm.info.id, reason="expired")

    def unload(self, name: str) -> bool:
        """Unload a model; requests in flight on it are cancelled. False if it was not loaded."""
        return self._unload_id(self.resolve(name).id)

    def _unload_id(self, model_id: str, reason: str = "unloaded") -> bool:
        with self._lock:
            lm = self._loaded.pop(model_id, None)
        if lm is None:
            return False
        lm.state = "unloading"
        lm.engine.close()
        log.info("%s %s", reason, model_id)
        self._publish(
            RegistryEvent(
                "evicted" if reason == "evicted" else "unloaded",
                model_id,
                detail={"reason": reason},
            )
        )
        return True

    def cancel_all(self) -> None:
        """Stop every generation in flight (shutdown)."""
        for lm in self.loaded():
            lm.engine.cancel_all()

    def close(self) -> None:
        """Unload everything."""
        self._closed.set()
        for lm in self.loaded():
            with contextlib.suppress(Exception):
                self.unload(lm.info.id)

    # ----- events --------------------------------------------------------------------------

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call `listener` for every event (from whatever thread publishes it)."""
        with self._lock:
            self._listeners.append(listener)

        def unsubscribe() -> None:
            with self._lock, contextlib.suppress(ValueError):
                self._listeners.remove(listener)

        return unsubscribe

    def _publish(self, event: RegistryEvent) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for fn in listeners:
            try:
                fn(event)
            except Exception:
                log.exception("event listener failed")
