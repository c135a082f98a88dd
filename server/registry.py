"""The single source of truth: available models, loaded instances, and events about both."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from server.discovery import ModelInfo, discover, resolve_name
from server.engines.llamacpp import EngineOptions, LlamaCppEngine
from server.errors import EngineFailure, InvalidRequest, ModelNotFound, ModelUnusable
from server.settings import Settings
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
    engine: LlamaCppEngine
    state: str = "ready"  # loading -> ready -> unloading
    loaded_at: float = field(default_factory=time.time)
    load_seconds: float = 0.0


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
        self.requests = RequestLog()
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
            self._publish(RegistryEvent("loading", info.id))
            t0 = time.perf_counter()
            engine = LlamaCppEngine(info, self.engine_options(info))
            try:
                engine.load()
            except EngineFailure as e:
                self._publish(RegistryEvent("load_failed", info.id, detail={"error": str(e)}))
                raise
            lm = LoadedModel(info, engine, load_seconds=time.perf_counter() - t0)
            with self._lock:
                self._loaded[info.id] = lm
            log.info("loaded %s in %.2fs", info.id, lm.load_seconds)
            self._publish(
                RegistryEvent("loaded", info.id, detail={"seconds": round(lm.load_seconds, 3)})
            )
            return lm
        finally:
            with self._lock:
                self._loading.pop(info.id, None)
            waiter.set()

    def unload(self, name: str) -> bool:
        """Unload a model; requests in flight on it are cancelled. False if it was not loaded."""
        info = self.resolve(name)
        with self._lock:
            lm = self._loaded.pop(info.id, None)
        if lm is None:
            return False
        lm.state = "unloading"
        lm.engine.close()
        self._publish(RegistryEvent("unloaded", info.id))
        return True

    def cancel_all(self) -> None:
        """Stop every generation in flight (shutdown)."""
        for lm in self.loaded():
            lm.engine.cancel_all()

    def close(self) -> None:
        """Unload everything."""
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
