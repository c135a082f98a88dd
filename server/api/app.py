"""The Litestar application factory: one controller per dialect, each answering errors in its
client's own shape through its own exception handlers."""

from __future__ import annotations

import hmac
import logging
from typing import Any

from litestar import Litestar, get
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.handlers.base import BaseRouteHandler
from litestar.openapi import OpenAPIConfig

from server import __version__
from server.api.admin import AdminController, metrics_handler
from server.api.anthropic import AnthropicController
from server.api.errors import OPENAI_ERRORS
from server.api.ollama import OllamaController
from server.api.openai import OpenAIController
from server.api.responses import ResponsesController
from server.api.tokens import TokensController
from server.errors import Unauthorized
from server.runtime import Runtime

log = logging.getLogger(__name__)


def _api_key_guard(rt: Runtime) -> Any:
    def guard(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
        key = rt.settings.api_key
        if not key or handler.opt.get("public"):
            return
        auth = connection.headers.get("authorization", "")
        given = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        given = given or connection.headers.get("x-api-key")
        if not given or not hmac.compare_digest(given.encode(), key.encode()):
            raise Unauthorized("Missing or invalid API key: send 'Authorization: Bearer <key>'.")

    return guard


@get("/health", opt={"public": True}, tags=["lmx"])
async def health(rt: NamedDependency[Runtime]) -> dict[str, Any]:
    return {
        "status": "ok",
        "server": "lmx",
        "version": __version__,
        "models_available": sum(1 for m in rt.catalog.models() if m.usable),
        "models_loaded": [lm.info.id for lm in rt.scheduler.loaded()],
    }


def create_app(rt: Runtime) -> Litestar:
    """Build the HTTP app over `rt` (shared with the TUI when it runs)."""
    return Litestar(
        route_handlers=[
            health,
            OpenAIController,
            ResponsesController,
            AnthropicController,
            TokensController,
            OllamaController,
            AdminController,
            metrics_handler(rt),
        ],
        dependencies={"rt": Provide(lambda: rt, use_cache=True, sync_to_thread=False)},
        guards=[_api_key_guard(rt)],
        # Routes no controller matched (404, 405) answer in OpenAI's shape.
        exception_handlers=OPENAI_ERRORS,
        state=State({"runtime": rt}),
        openapi_config=OpenAPIConfig(title="lmx", version=__version__, path="/schema"),
        request_max_body_size=32 * 1024 * 1024,
        debug=False,
    )
