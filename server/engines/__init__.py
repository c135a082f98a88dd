"""Engines: what runs a model. `create_engine` is the one place that picks a concrete class."""

from __future__ import annotations

import os
from collections.abc import Callable

from server.discovery import ModelInfo
from server.engines.base import Engine, EngineOptions

EngineFactory = Callable[[ModelInfo, EngineOptions], Engine]

# lmx numbers GPUs as NVML does (PCI bus order, server/gpus.py); CUDA's default order is
# fastest first. This package is imported before any engine starts llama.cpp's CUDA backend,
# so main_gpu and tensor_split name the GPUs lmx measured.
os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")


def create_engine(info: ModelInfo, options: EngineOptions) -> Engine:
    """A new, not yet loaded engine for `info`, chosen by its format."""
    if info.format == "gguf":
        from server.engines.llamacpp import LlamaCppEngine

        return LlamaCppEngine(info, options)
    if info.format == "mlx":
        from server.engines.mlx import MlxEngine

        return MlxEngine(info, options)
    if info.format == "upstream":
        from server.engines.upstream import UpstreamEngine

        return UpstreamEngine(info, options)
    raise ValueError(f"no engine for models of format {info.format!r} ({info.id})")


def gpu_offload_supported() -> bool:
    """Whether the local engine (llama.cpp, as built here) can put layers on a GPU."""
    from server.engines.llamacpp import supports_gpu_offload

    return supports_gpu_offload()


__all__ = ["Engine", "EngineFactory", "EngineOptions", "create_engine", "gpu_offload_supported"]
