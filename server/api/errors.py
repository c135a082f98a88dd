"""Errors on the wire: each router maps domain errors, validation failures and HTTP errors to
its client's dialect through these handler factories (never by looking at the URL)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.types import ExceptionHandlersMap

from server.errors import LmxError
from server.keys import current_key
from server.telemetry import RequestRecord

log = logging.getLogger(__name__)

# (status, message, type, code, param) -> the body of the dialect's error
Shape = Callable[[int, str, str | None, str | None, str | None], Any]

HTTP_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
}


def openai_shape(
    status: int, message: str, type_: str | None, code: str | None, param: str | None
) -> Any:
    return {
        "error": {
            "message": message,
            "type": type_ or HTTP_TYPES.get(status, "server_error"),
            "param": param,
            "code": code,
        }
    }


def ollama_shape(
    status: int, message: str, type_: str | None, code: str | None, param: str | None
) -> Any:
    return {"error": message}


def _record(request: Request[Any, Any, Any], status: int) -> None:
    rt = request.app.state.get("runtime")
    if rt is not None:
        rt.requests.record(
            RequestRecord(
                at=time.time(),
                method=request.method,
                path=request.url.path,
                model=None,
                status=status,
                key=key.name if (key := current_key.get()) is not None else None,
            )
        )


# Plain words for fields whose schema is a pattern or a union (msgspec would quote a regex).
FIELD_RULES = {
    "keep_alive": "a duration such as 10m, 1h30m, 45s, 0 or -1 (seconds when a number)",
    "input": "a non-empty string or a list of non-empty strings (token arrays are not supported)",
    "prompt": "a non-empty string or a list of non-empty strings",
    "logit_bias": "an object whose keys are token ids",
}


def describe_validation(exc: ValidationException) -> tuple[str, str | None]:
    """A one-line message and the field at fault, from Litestar/msgspec's report."""
    extra = exc.extra
    if isinstance(extra, list) and extra and isinstance(extra[0], dict):
        first = extra[0]
        msg = str(first.get("message") or exc.detail)
        key = first.get("key")
        if "malformed" in msg.lower():
            return f"Invalid JSON body: {msg}", None
        if key and key != "data":
            field = str(key).split(".")[-1].split("[")[0]
            if field in FIELD_RULES and ("regex" in msg or "Expected `str`" in msg):
                return f"Invalid request: {key} must be {FIELD_RULES[field]}.", str(key)
            return f"Invalid request: {msg} (at '{key}')", str(key)
        return f"Invalid request: {msg}", None
    return str(exc.detail or "Invalid request"), None


def handlers(
    shape: Shape, phrase: Callable[[LmxError], str | None] | None = None
) -> ExceptionHandlersMap:
    """Exception handlers that answer in `shape`'s dialect; `phrase` words an error as the
    dialect's clients look for it (None: the error's own message)."""

    def respond(
        status: int,
        message: str,
        type_: str | None = None,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response[Any]:
        return Response(
            shape(status, message, type_, code, param), status_code=status, headers=headers
        )

    def lmx_error(request: Request[Any, Any, Any], exc: LmxError) -> Response[Any]:
        _record(request, exc.status)
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
        message = (phrase(exc) if phrase is not None else None) or exc.message
        return respond(exc.status, message, exc.type, exc.code, exc.param, headers)

    def validation_error(
        request: Request[Any, Any, Any], exc: ValidationException
    ) -> Response[Any]:
        message, param = describe_validation(exc)
        _record(request, 400)
        return respond(400, message, code="invalid_value", param=param)

    def http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
        status = exc.status_code
        _record(request, status)
        message = str(exc.detail)
        if status == 404 and message in ("Not Found", ""):
            message = f"No route for {request.method} {request.url.path}"
        elif status == 400:
            message = f"Invalid JSON body: {message}"
        if status >= 500:
            log.error("HTTP %s on %s: %s", status, request.url.path, message)
        return respond(status, message, headers=exc.headers)

    def internal_error(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        _record(request, 500)
        return respond(500, f"Internal error: {type(exc).__name__}: {exc}")

    return {
        LmxError: lmx_error,
        ValidationException: validation_error,
        HTTPException: http_error,
        Exception: internal_error,
    }


OPENAI_ERRORS = handlers(openai_shape)
OLLAMA_ERRORS = handlers(ollama_shape)
