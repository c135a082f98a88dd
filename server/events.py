"""Typed events about models and downloads, published to whoever listens (SSE, the TUI)."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LmxEvent:
    """Something happened. `kind`: loading, load_waiting, loaded, load_failed, unloaded (its
    `reason`: expired, unloaded, ...), evicted, engine_failed, reconfigured, pinned, unpinned,
    removed, config_reloaded, config_error, download_{queued,progress,done,failed,cancelled,
    paused}."""

    kind: str
    model: str
    at: float = field(default_factory=time.time)
    detail: dict[str, Any] = field(default_factory=dict)


Listener = Callable[[LmxEvent], None]


class EventBus:
    """Fan-out to listeners, from whatever thread publishes; a failing listener is logged."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._listeners: list[Listener] = []

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        with self._lock:
            self._listeners.append(listener)

        def unsubscribe() -> None:
            with self._lock, contextlib.suppress(ValueError):
                self._listeners.remove(listener)

        return unsubscribe

    def publish(self, kind: str, model: str = "", **detail: Any) -> None:
        event = LmxEvent(kind, model, detail=detail)
        with self._lock:
            listeners = list(self._listeners)
        for fn in listeners:
            try:
                fn(event)
            except Exception:
                log.exception("event listener failed")
