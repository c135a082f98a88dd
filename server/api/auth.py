"""Who may call which route: the API key guard.

Every route needs a key once any is set (`api_key`, `admin_key`, `api_key_file`), except the
ones marked `opt={"public": True}` (/health) and /metrics when `metrics_public` is on. A route's
`opt["scope"]` says which scope it needs: `inference` (the default) or `admin` (the admin API,
pulls and deletes). No key or an unknown one: 401; a key without the scope: 403; both raised as
LmxErrors, so each router answers in its own dialect.
"""

from __future__ import annotations

from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from server.errors import Forbidden, Unauthorized
from server.keys import current_key
from server.runtime import Runtime


def given_key(connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
    """The key a client sent: `Authorization: Bearer KEY` (OpenAI, Ollama clients) or
    `X-API-Key: KEY` (Anthropic clients)."""
    auth = connection.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return connection.headers.get("x-api-key") or None


def key_guard(rt: Runtime) -> Any:
    """The app-wide guard over `rt.keys` (async, so the key it finds stays in the request's
    context for the handler and the pipeline)."""

    async def guard(
        connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler
    ) -> None:
        opt = handler.opt
        if opt.get("public") or (opt.get("metrics") and rt.settings.metrics_public):
            return
        if not rt.keys.enabled:
            return
        key = rt.keys.identify(given_key(connection))
        if key is None:
            raise Unauthorized(
                "Missing or invalid API key: send 'Authorization: Bearer <key>' "
                "(or 'X-API-Key: <key>')."
            )
        current_key.set(key)
        scope = opt.get("scope", "inference")
        if not key.allows(scope):
            raise Forbidden(
                f"The key '{key.name}' may only use the inference API; "
                f"{connection.url.path} needs an admin key."
            )

    return guard
