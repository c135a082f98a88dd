"""The NVIDIA GPUs lmx may place models on: index, name, total and free VRAM, read from NVML
(nvidia-ml-py's `pynvml`). No GPU, no driver, no library or an NVML error is an empty list
with a note saying why, never an exception.

Indices are CUDA's device ordinals, which llama.cpp's `main_gpu` and `tensor_split` use: the
GPUs `CUDA_VISIBLE_DEVICES` leaves visible, in NVML's order (PCI bus order; the llama.cpp
engine sets `CUDA_DEVICE_ORDER=PCI_BUS_ID` unless it is set, so that CUDA agrees).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# VRAM kept out of the budget on each GPU: the CUDA context, cuBLAS workspace and allocator
# slack that llama.cpp uses outside the buffers the estimate counts.
VRAM_RESERVE = 512 * 2**20
DEFAULT_TTL = 2.0  # seconds an NVML reading is reused


@dataclass(frozen=True)
class Gpu:
    """One NVIDIA GPU as NVML saw it."""

    index: int  # CUDA's ordinal: llama.cpp's main_gpu / tensor_split position
    name: str
    total: int  # bytes
    free: int  # bytes free at the reading, whoever uses the rest

    @property
    def device(self) -> str:
        """Its key in budgets and `MemoryEstimate.by_device()`."""
        return f"gpu{self.index}"

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "total": self.total, "free": self.free}


class GpuInventory:
    """NVML's GPUs, read at most every `ttl` seconds (`invalidate()` forces the next read).
    NVML is initialized once, on the first read; if that fails there are no GPUs for the life
    of the inventory (a driver does not appear under a running process). Thread-safe."""

    def __init__(self, ttl: float = DEFAULT_TTL, clock: Callable[[], float] = time.monotonic):
        self.ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._nvml: Any = None
        self._gpus: list[Gpu] = []
        self._note = ""
        self._opened = False
        self._read_at: float | None = None

    def gpus(self) -> list[Gpu]:
        """The visible GPUs now (a reading at most `ttl` old)."""
        with self._lock:
            if not self._opened:
                self._opened = True
                self._nvml, self._note = open_nvml()
                if self._note:
                    log.info("%s", self._note)
            if self._nvml is None:
                return []
            now = self._clock()
            if self._read_at is None or now - self._read_at >= self.ttl:
                self._gpus, note = read_gpus(self._nvml)
                self._read_at = now
                if note and note != self._note:
                    log.warning("%s", note)
                self._note = note
            return list(self._gpus)

    @property
    def note(self) -> str:
        """Why there are no GPUs ("" when there are)."""
        self.gpus()
        return self._note

    def invalidate(self) -> None:
        """Read NVML again next time (a model was loaded or unloaded: free VRAM moved)."""
        with self._lock:
            self._read_at = None


def open_nvml() -> tuple[Any, str]:
    """The initialized `pynvml` module, or None and why not."""
    try:
        import pynvml
    except ImportError:
        return None, "no NVIDIA GPU (nvidia-ml-py missing)"
    try:
        pynvml.nvmlInit()
    except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return None, f"no NVIDIA GPU ({nvml_reason(e)})"
    return pynvml, ""


def read_gpus(pynvml: Any) -> tuple[list[Gpu], str]:
    """One reading from an initialized NVML: the visible GPUs, and a note when there are none."""
    try:
        count = int(pynvml.nvmlDeviceGetCount())
        order = visible_indices(pynvml, count)
        out = []
        for cuda_index, nvml_index in enumerate(order):
            handle = pynvml.nvmlDeviceGetHandleByIndex(nvml_index)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            if isinstance(name, bytes):
                name = name.decode("utf-8", "replace")
            out.append(Gpu(cuda_index, str(name), int(mem.total), int(mem.free)))
    except Exception as e:
        return [], f"no NVIDIA GPU (NVML: {nvml_reason(e)})"
    if not out:
        hidden = os.environ.get("CUDA_VISIBLE_DEVICES") is not None and count
        return [], "no NVIDIA GPU visible (CUDA_VISIBLE_DEVICES)" if hidden else "no NVIDIA GPU"
    return out, ""


def visible_indices(pynvml: Any, count: int) -> list[int]:
    """NVML indices of the GPUs CUDA will see, in CUDA's order (CUDA_VISIBLE_DEVICES: indices
    or GPU-UUID prefixes; as CUDA does, the list ends at the first entry that names none)."""
    spec = os.environ.get("CUDA_VISIBLE_DEVICES")
    if spec is None:
        return list(range(count))
    uuids: list[str] | None = None
    out: list[int] = []
    for item in (s.strip() for s in spec.split(",")):
        if item.isdigit() and int(item) < count:
            found: int | None = int(item)
        elif item.upper().startswith("GPU-"):
            if uuids is None:
                uuids = [_uuid(pynvml, i) for i in range(count)]
            matches = [i for i, u in enumerate(uuids) if u.upper().startswith(item.upper())]
            found = matches[0] if len(matches) == 1 else None
        else:
            found = None
        if found is None or found in out:
            break
        out.append(found)
    return out


def _uuid(pynvml: Any, index: int) -> str:
    u = pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(index))
    return u.decode() if isinstance(u, bytes) else str(u)


def nvml_reason(e: Exception) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:80]
