"""The Litestar application factory: one controller per dialect, each answering errors in its
client's own shape through its own exception handlers."""

from __future__ import annotations

import logging
from typing import Any

from litestar import Litestar, get, head
from litestar.config.cors import CORSConfig
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.openapi import OpenAPIConfig

from server import __version__
from server.api import ollama, schemas
from server.api.admin import AdminController, DownloadBody, metrics_handler
from server.api.anthropic import AnthropicController
from server.api.auth import key_guard
from server.api.errors import OPENAI_ERRORS
from server.api.ollama import OllamaController
from server.api.openai import OpenAIController
from server.api.rerank import RerankBody, RerankController
from server.api.responses import ResponsesController
from server.api.tokens import TokensController
from server.runtime import Runtime

log = logging.getLogger(__name__)


def cors_config(origins: tuple[str, ...]) -> CORSConfig | None:
    """Browsers on these origins may call the API (off when there are none)."""
    if not origins:
        return None
    return CORSConfig(
        allow_origins=list(origins),
        allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
        allow_headers=["authorization", "content-type", "x-api-key"],
        expose_headers=["retry-after"],
        max_age=600,
    )


@get("/health", opt={"public": True}, tags=["lmx"])
async def health(rt: NamedDependency[Runtime]) -> dict[str, Any]:
    return {
        "status": "ok",
        "server": "lmx",
        "version": __version__,
        "models_available": sum(1 for m in rt.catalog.models() if m.usable),
        "models_loaded": [lm.info.id for lm in rt.scheduler.loaded()],
    }


@get("/", opt={"public": True}, tags=["lmx"], media_type="text/plain")
async def root() -> str:
    """What Ollama's root answers: a probe (Claude Code's `HEAD /`, uptime checks) gets a 200."""
    return "lmx is running"


@head("/", opt={"public": True}, tags=["lmx"])
async def root_head() -> None:
    return None


# Every request body, for the OpenAPI document's components.
BODIES: list[type] = [
    schemas.ChatCompletionRequest,
    schemas.CompletionRequest,
    schemas.EmbeddingRequest,
    RerankBody,
    ollama.ChatBody,
    ollama.GenerateBody,
    ollama.EmbedBody,
    ollama.EmbeddingsBody,
    ollama.ModelBody,
    ollama.PullBody,
    DownloadBody,
]


def create_app(rt: Runtime) -> Litestar:
    """Build the HTTP app over `rt` (shared with the TUI when it runs)."""
    app = Litestar(
        route_handlers=[
            root,
            root_head,
            health,
            OpenAIController,
            ResponsesController,
            AnthropicController,
            TokensController,
            RerankController,
            OllamaController,
            AdminController,
            metrics_handler(rt),
        ],
        dependencies={
            "rt": Provide(lambda: rt, use_cache=True, sync_to_thread=False),
            # The control plane, for handlers that manage models and need nothing else.
            "models": Provide(lambda: rt.models, use_cache=True, sync_to_thread=False),
        },
        guards=[key_guard(rt)],
        cors_config=cors_config(rt.settings.cors_origins),
        # Routes no controller matched (404, 405) answer in OpenAI's shape.
        exception_handlers=OPENAI_ERRORS,
        state=State({"runtime": rt}),
        openapi_config=OpenAPIConfig(title="lmx", version=__version__, path="/schema"),
        request_max_body_size=32 * 1024 * 1024,
        debug=False,
    )
    schemas.state_constraints(app.openapi_schema, BODIES)
    return app
