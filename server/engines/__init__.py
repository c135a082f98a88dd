"""Engines: what runs a model. `create_engine` is the one place that picks a concrete class."""

from __future__ import annotations

from collections.abc import Callable

from server.discovery import ModelInfo
from server.engines.base import Engine, EngineOptions

EngineFactory = Callable[[ModelInfo, EngineOptions], Engine]


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


__all__ = ["Engine", "EngineFactory", "EngineOptions", "create_engine"]
