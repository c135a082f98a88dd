"""The sampler thread behind the gauges: frozen snapshots posted to the app at 2 Hz."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from textual.message import Message

from server.pipeline import RunStatus
from server.runtime import Runtime
from server.telemetry import SystemSampler, SystemSnapshot

RATE_WINDOW = 2.0  # seconds over which a model's tokens/s is measured


@dataclass(frozen=True)
class ModelStat:
    """One loaded model at one instant."""

    model: str
    state: str
    slots: int
    slots_busy: int
    queue_depth: int
    tokens_total: int
    tokens_per_s: float
    ttft_ms: float | None
    slot_states: tuple[tuple[str, int], ...] = ()  # (idle | prefill | decode, cached tokens)


@dataclass(frozen=True)
class ModelMemory:
    """One loaded model's share of the budget."""

    model: str
    by_device: tuple[tuple[str, int], ...]  # the estimate, per device
    estimate: int
    measured: int
    pinned: bool


@dataclass(frozen=True)
class MemorySnapshot:
    """The budget per device and what the loaded models take of it."""

    budgets: tuple[tuple[str, int], ...]
    models: tuple[ModelMemory, ...]
    # The prompt cache: KV states of prompt prefixes kept in host RAM (a share of the RAM
    # budget) and spilled to disk (outside it).
    cache_ram: int = 0
    cache_disk: int = 0
    cache_entries: int = 0

    def used(self, device: str) -> int:
        cache = self.cache_ram if device == "ram" else 0
        return cache + sum(b for m in self.models for d, b in m.by_device if d == device)


@dataclass(frozen=True)
class MonitorSnapshot:
    """Everything the gauges show, taken together off the UI thread."""

    system: SystemSnapshot
    models: tuple[ModelStat, ...]
    memory: MemorySnapshot = MemorySnapshot((), ())
    requests: tuple[RunStatus, ...] = ()


class SnapshotReady(Message):
    """A new snapshot; a newer one replaces an unhandled older one."""

    def __init__(self, snapshot: MonitorSnapshot) -> None:
        super().__init__()
        self.snapshot = snapshot

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, SnapshotReady)


class MonitorSampler:
    """Takes snapshots of the machine and of every loaded model."""

    def __init__(self, rt: Runtime, system: Callable[[], SystemSnapshot] | None = None):
        self.rt = rt
        self._system = system or SystemSampler().sample
        # (time, tokens generated) per model over the last RATE_WINDOW seconds: a rate from
        # one sampling interval alone jumps between 0 and a burst.
        self._seen: dict[str, deque[tuple[float, int]]] = {}

    def sample(self) -> MonitorSnapshot:
        now = time.monotonic()
        models = []
        last_ttft: dict[str, float] = {}
        for rec in self.rt.requests.recent(200):
            if rec.model and rec.ttft_ms is not None:
                last_ttft[rec.model] = rec.ttft_ms
        sched = self.rt.scheduler
        shares = []
        for lm in sched.loaded():
            shares.append(
                ModelMemory(
                    lm.info.id,
                    tuple(lm.estimate.by_device().items()),
                    lm.estimate.total,
                    lm.measured,
                    sched.is_pinned(lm.info.id),
                )
            )
            if lm.engine is None:
                continue
            st = lm.engine.stats()
            total = int(st["tokens_generated"])
            seen = self._seen.setdefault(lm.info.id, deque())
            seen.append((now, total))
            while len(seen) > 2 and now - seen[1][0] >= RATE_WINDOW:
                seen.popleft()
            t0, n0 = seen[0]
            rate = (total - n0) / (now - t0) if now > t0 else 0.0
            models.append(
                ModelStat(
                    model=lm.info.id,
                    state="busy" if st["slots_busy"] else str(lm.state),
                    slots=int(st["slots"]),
                    slots_busy=int(st["slots_busy"]),
                    queue_depth=int(st["queue_depth"]),
                    tokens_total=total,
                    tokens_per_s=max(0.0, rate),
                    ttft_ms=last_ttft.get(lm.info.id),
                    slot_states=tuple(tuple(x) for x in st.get("slot_states", ())),
                )
            )
        cache = self.rt.prefix_store.stats()
        memory = MemorySnapshot(
            tuple(sched.budgets().items()),
            tuple(shares),
            cache.ram_bytes,
            cache.disk_bytes,
            cache.entries,
        )
        return MonitorSnapshot(
            self._system(), tuple(models), memory, tuple(self.rt.service.in_flight())
        )


class SamplerThread(threading.Thread):
    """Posts a snapshot every `interval` seconds until stopped (joined on unmount)."""

    def __init__(
        self, sampler: MonitorSampler, post: Callable[[Message], object], interval: float = 0.5
    ) -> None:
        super().__init__(name="lmx-monitor", daemon=True)
        self.sampler, self.post, self.interval = sampler, post, interval
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            with contextlib.suppress(Exception):  # a failed sample must not end the gauges
                self.post(SnapshotReady(self.sampler.sample()))
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)
