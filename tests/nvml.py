"""A stand-in for nvidia-ml-py's `pynvml` module: the one seam faked for GPUs, since no NVIDIA
GPU exists here. Installed in `sys.modules` by a fixture; GPUs and faults are set per test."""

from __future__ import annotations

import types
from dataclasses import dataclass, field


class NVMLError(Exception):
    """As pynvml raises (NVMLError_DriverNotLoaded and friends are its subclasses)."""


@dataclass
class FakeGpu:
    name: str
    total: int
    free: int
    uuid: str = ""
    utilization: int = 0


@dataclass
class _Memory:
    total: int
    free: int
    used: int


@dataclass
class _Utilization:
    gpu: int
    memory: int = 0


@dataclass
class FakeNvml:
    """The GPUs the fake module reports, and what should fail."""

    gpus: list[FakeGpu] = field(default_factory=list)
    init_error: str | None = None  # nvmlInit raises this (no driver)
    memory_error: str | None = None  # nvmlDeviceGetMemoryInfo raises this
    inits: int = 0
    reads: int = 0  # memory readings served

    def module(self) -> types.ModuleType:
        m = types.ModuleType("pynvml")
        m.NVMLError = NVMLError  # type: ignore[attr-defined]

        def init() -> None:
            if self.init_error:
                raise NVMLError(self.init_error)
            self.inits += 1

        def handle(i: int) -> int:
            if not 0 <= i < len(self.gpus):
                raise NVMLError("Invalid Argument")
            return i

        def memory(h: int) -> _Memory:
            if self.memory_error:
                raise NVMLError(self.memory_error)
            self.reads += 1
            g = self.gpus[h]
            return _Memory(g.total, g.free, g.total - g.free)

        m.nvmlInit = init  # type: ignore[attr-defined]
        m.nvmlShutdown = lambda: None  # type: ignore[attr-defined]
        m.nvmlDeviceGetCount = lambda: len(self.gpus)  # type: ignore[attr-defined]
        m.nvmlDeviceGetHandleByIndex = handle  # type: ignore[attr-defined]
        m.nvmlDeviceGetMemoryInfo = memory  # type: ignore[attr-defined]
        m.nvmlDeviceGetName = lambda h: self.gpus[h].name  # type: ignore[attr-defined]
        m.nvmlDeviceGetUUID = lambda h: self.gpus[h].uuid or f"GPU-{h:08x}-fake"  # type: ignore[attr-defined]
        m.nvmlDeviceGetUtilizationRates = lambda h: _Utilization(self.gpus[h].utilization)  # type: ignore[attr-defined]
        return m
