"""The Litestar application factory and the mapping of errors to each client's dialect."""

from __future__ import annotations

import hmac
import logging
import time
from typing import Any

from litestar import Litestar, Request, Response, get
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.exceptions import HTTPException, ValidationException
from litestar.handlers.base import BaseRouteHandler
from litestar.openapi import OpenAPIConfig

from server import __version__
from server.api.admin import AdminController, metrics_handler
from server.api.ollama import OllamaController
from server.api.openai import OpenAIController
from server.errors import LmxError, QueueFull, Unauthorized
from server.registry import Registry
from server.settings import Settings
from server.telemetry import RequestRecord

log = logging.getLogger(__name__)

_HTTP_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
}


def error_response(
    request: Request[Any, Any, Any],
    status: int,
    message: str,
    *,
    type_: str | None = None,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response[Any]:
    """An error in the route's dialect: Ollama's `{"error": "..."}` under /api, else OpenAI's."""
    if request.url.path.startswith("/api/"):
        body: dict[str, Any] = {"error": message}
    else:
        body = {
            "error": {
                "message": message,
                "type": type_ or _HTTP_TYPES.get(status, "server_error"),
                "param": param,
                "code": code,
            }
        }
    return Response(body, status_code=status, headers=headers)


def _log_error(request: Request[Any, Any, Any], status: int) -> None:
    registry = request.app.state.get("registry")
    if registry is not None:
        registry.requests.record(
            RequestRecord(
                at=time.time(),
                method=request.method,
                path=request.url.path,
                model=None,
                status=status,
            )
        )


def _lmx_error(request: Request[Any, Any, Any], exc: LmxError) -> Response[Any]:
    _log_error(request, exc.status)
    headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, QueueFull) else None
    return error_response(
        request,
        exc.status,
        exc.message,
        type_=exc.type,
        code=exc.code,
        param=exc.param,
        headers=headers,
    )


def _validation_error(request: Request[Any, Any, Any], exc: ValidationException) -> Response[Any]:
    message, param = _describe_validation(exc)
    _log_error(request, 400)
    return error_response(request, 400, message, code="invalid_value", param=param)


def _describe_validation(exc: ValidationException) -> tuple[str, str | None]:
    extra = exc.extra
    if isinstance(extra, list) and extra and isinstance(extra[0], dict):
        first = extra[0]
        msg = str(first.get("message") or exc.detail)
        key = first.get("key")
        if "JSON is malformed" in msg or "malformed" in msg.lower():
            return f"Invalid JSON body: {msg}", None
        if key and key != "data":
            return f"Invalid request: {msg} (at '{key}')", str(key)
        return f"Invalid request: {msg}", None
    detail = str(exc.detail or "Invalid request")
    return detail, None


def _http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    status = exc.status_code
    _log_error(request, status)
    message = str(exc.detail)
    if status == 404 and message in ("Not Found", ""):
        message = f"No route for {request.method} {request.url.path}"
    elif status == 400:
        message = f"Invalid JSON body: {message}"
    if status >= 500:
        log.error("HTTP %s on %s: %s", status, request.url.path, message)
    return error_response(request, status, message, headers=exc.headers)


def _internal_error(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    _log_error(request, 500)
    return error_response(request, 500, f"Internal error: {type(exc).__name__}: {exc}")


def _api_key_guard(settings: Settings) -> Any:
    def guard(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
        key = settings.api_key
        if not key or handler.opt.get("public"):
            return
        auth = connection.headers.get("authorization", "")
        given = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        given = given or connection.headers.get("x-api-key")
        if not given or not hmac.compare_digest(given.encode(), key.encode()):
            raise Unauthorized("Missing or invalid API key: send 'Authorization: Bearer <key>'.")

    return guard


@get("/health", opt={"public": True}, tags=["lmx"])
async def health(registry: NamedDependency[Registry]) -> dict[str, Any]:
    return {
        "status": "ok",
        "version": __version__,
        "models_available": sum(1 for m in registry.models() if m.usable),
        "models_loaded": [lm.info.id for lm in registry.loaded()],
    }


def create_app(registry: Registry, settings: Settings | None = None) -> Litestar:
    """Build the HTTP app over `registry` (shared with the TUI when it runs)."""
    settings = settings or registry.settings
    return Litestar(
        route_handlers=[
            health,
            OpenAIController,
            OllamaController,
            AdminController,
            metrics_handler(registry),
        ],
        dependencies={
            "registry": Provide(lambda: registry, use_cache=True, sync_to_thread=False),
        },
        guards=[_api_key_guard(settings)],
        exception_handlers={
            LmxError: _lmx_error,
            ValidationException: _validation_error,
            HTTPException: _http_error,
            Exception: _internal_error,
        },
        state=State({"registry": registry}),
        openapi_config=OpenAPIConfig(title="lmx", version=__version__, path="/schema"),
        request_max_body_size=32 * 1024 * 1024,
        debug=False,
    )
