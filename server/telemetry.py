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


class RequestLog:
    """Recent API requests (bounded) and running totals. Thread-safe."""

    def __init__(self, maxlen: int = 500) -> None:
        self._records: deque[RequestRecord] = deque(maxlen=maxlen)
        self._lock = threading.Lock()
        self._listeners: list[RecordListener] = []
        self.total = 0
        self.by_status: dict[int, int] = {}

    def record(self, rec: RequestRecord) -> None:
        with self._lock:
            self._records.append(rec)
            self.total += 1
            self.by_status[rec.status] = self.by_status.get(rec.status, 0) + 1
            listeners = list(self._listeners)
        for fn in listeners:
            with contextlib.suppress(Exception):
                fn(rec)

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
        try:
            import pynvml
        except ImportError:
            return cls(note="no NVIDIA GPU (nvidia-ml-py missing)")
        try:
            pynvml.nvmlInit()
            n = pynvml.nvmlDeviceGetCount()
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(n)]
        except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
            return cls(note=f"no NVIDIA GPU ({_nvml_reason(e)})")
        if not handles:
            return cls(note="no NVIDIA GPU")
        return cls(module=pynvml, handles=handles)

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


def _nvml_reason(e: Exception) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:80]


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
