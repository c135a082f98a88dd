"""Telemetry: the request log and system/GPU samples. One source for the TUI and /metrics."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil

from server.gpus import nvml_reason, open_nvml, visible_indices


@dataclass(frozen=True)
class RequestRecord:
    """One finished API request."""

    at: float
    method: str
    path: str
    model: str | None
    status: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    latency_ms: float = 0.0
    ttft_ms: float | None = None
    source: str = "api"  # which front end: openai, ollama, admin, tui, cli
    key: str | None = None  # the API key's name (never the key), None when unkeyed
    id: str = ""  # the generation pipeline's request id (its detail: RequestLog.detail)
    finish_reason: str = ""  # stop, length, cancelled, error (the first choice's)


@dataclass(frozen=True)
class RequestDetail:
    """What a finished generation asked and answered, for its detail view (texts clipped)."""

    id: str
    messages: tuple[dict[str, str], ...]
    prompts: tuple[str, ...]
    replies: tuple[str, ...]
    finish_reasons: tuple[str, ...]
    timings: tuple[dict[str, Any], ...]
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class GpuSnapshot:
    """One GPU as NVML sees it."""

    index: int
    name: str
    memory_used: int
    memory_total: int
    utilization: int


@dataclass(frozen=True)
class SystemSnapshot:
    """Machine-wide figures at one instant."""

    at: float
    cpu_percent: float
    ram_used: int
    ram_total: int
    process_rss: int
    gpus: tuple[GpuSnapshot, ...] = ()
    gpu_note: str = ""


RecordListener = Callable[[RequestRecord], None]

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


@dataclass
class Histogram:
    """Cumulative bucket counts (Prometheus semantics: they never go down)."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def observe(self, value: float) -> None:
        if not self.counts:
            self.counts = [0] * len(self.bounds)
        for i, b in enumerate(self.bounds):
            if value <= b:
                self.counts[i] += 1
        self.total += value
        self.n += 1


@dataclass
class ModelTotals:
    """Running totals for one model since lmx started."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    latency: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))


class RequestLog:
    """Recent API requests (bounded, for the TUI) and running totals since start (unbounded
    in time, for /metrics: a counter must never fall when old records roll off). Thread-safe."""

    def __init__(self, maxlen: int = 500, details: int = 64) -> None:
        self._records: deque[RequestRecord] = deque(maxlen=maxlen)
        self._details: deque[RequestDetail] = deque(maxlen=details)
        self._lock = threading.Lock()
        self._listeners: list[RecordListener] = []
        self._counts: dict[tuple[str, int, str], int] = {}
        self._models: dict[str, ModelTotals] = {}

    def record(self, rec: RequestRecord) -> None:
        with self._lock:
            self._records.append(rec)
            key = (rec.model or "", rec.status, rec.key or "")
            self._counts[key] = self._counts.get(key, 0) + 1
            if rec.model:
                t = self._models.setdefault(rec.model, ModelTotals())
                t.prompt_tokens += rec.prompt_tokens
                t.cached_tokens += rec.cached_tokens
                if rec.ttft_ms is not None:
                    t.ttft.observe(rec.ttft_ms / 1000)
                t.latency.observe(rec.latency_ms / 1000)
            listeners = list(self._listeners)
        for fn in listeners:
            with contextlib.suppress(Exception):
                fn(rec)

    def keep_detail(self, detail: RequestDetail) -> None:
        """Keep a finished request's texts (the oldest fall off: memory stays bounded)."""
        with self._lock:
            self._details.append(detail)

    def detail(self, request_id: str) -> RequestDetail | None:
        with self._lock:
            return next((d for d in reversed(self._details) if d.id == request_id), None)

    def totals(self) -> tuple[dict[tuple[str, int, str], int], dict[str, ModelTotals]]:
        """Requests by (model, status, key name) and per-model totals, copied under the lock."""
        import copy

        with self._lock:
            return dict(self._counts), copy.deepcopy(self._models)

    def recent(self, n: int = 100) -> list[RequestRecord]:
        with self._lock:
            return list(self._records)[-n:]

    def subscribe(self, fn: RecordListener) -> Callable[[], None]:
        with self._lock:
            self._listeners.append(fn)

        def unsubscribe() -> None:
            with self._lock, contextlib.suppress(ValueError):
                self._listeners.remove(fn)

        return unsubscribe


@dataclass
class _Nvml:
    """NVML through its Python module (nvidia-ml-py); absent or failing means no GPU."""

    module: Any = None
    note: str = ""
    handles: list[Any] = field(default_factory=list)

    @classmethod
    def open(cls) -> _Nvml:
        """server/gpus.py's NVML, with its GPUs in CUDA's order: GPU n here is GPU n in the
        memory budget and in llama.cpp's device list."""
        module, note = open_nvml()
        if module is None:
            return cls(note=note)
        try:
            order = visible_indices(module, int(module.nvmlDeviceGetCount()))
            handles = [module.nvmlDeviceGetHandleByIndex(i) for i in order]
        except Exception as e:
            return cls(note=f"no NVIDIA GPU (NVML: {nvml_reason(e)})")
        if not handles:
            return cls(note="no NVIDIA GPU")
        return cls(module=module, handles=handles)

    def sample(self) -> tuple[GpuSnapshot, ...]:
        if self.module is None:
            return ()
        out = []
        for i, h in enumerate(self.handles):
            try:
                mem = self.module.nvmlDeviceGetMemoryInfo(h)
                util = self.module.nvmlDeviceGetUtilizationRates(h)
                name = self.module.nvmlDeviceGetName(h)
            except Exception:
                continue
            if isinstance(name, bytes):
                name = name.decode("utf-8", "replace")
            out.append(GpuSnapshot(i, str(name), int(mem.used), int(mem.total), int(util.gpu)))
        return tuple(out)


class SystemSampler:
    """Samples CPU, RAM, this process and every NVIDIA GPU."""

    def __init__(self) -> None:
        self._nvml = _Nvml.open()
        self._proc = psutil.Process(os.getpid())
        psutil.cpu_percent(None)  # the first reading is meaningless; prime it

    @property
    def gpu_note(self) -> str:
        return self._nvml.note

    def sample(self) -> SystemSnapshot:
        vm = psutil.virtual_memory()
        return SystemSnapshot(
            at=time.time(),
            cpu_percent=psutil.cpu_percent(None),
            ram_used=int(vm.total - vm.available),
            ram_total=int(vm.total),
            process_rss=int(self._proc.memory_info().rss),
            gpus=self._nvml.sample(),
            gpu_note=self._nvml.note,
        )
