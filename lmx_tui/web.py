"""`lmx --web`: the app in a browser, through textual-serve. Each browser session runs the lmx
app (`lmx` with the same flags) in a process of its own, shown in the page; the first one also
serves the API on --port. The page is served on --host (loopback unless an API key is set, as
for the API); with an API key the page asks for it once (`?key=KEY`, then a cookie)."""

from __future__ import annotations

import hmac
import shlex
import sys
from collections.abc import Awaitable, Callable

from aiohttp import web
from textual_serve.server import Server

from server.settings import ConfigStore

KEY_COOKIE = "lmx_key"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def session_command(argv: list[str]) -> str:
    """The shell command textual-serve runs for each browser session."""
    return shlex.join([sys.executable, "-m", "lmx_tui.cli", *argv])


class LmxWebServer(Server):
    """textual-serve's server, with lmx's API key rule in front of every route."""

    def __init__(self, command: str, host: str, port: int, api_key: str | None) -> None:
        shown = f"[{host}]" if ":" in host else host
        super().__init__(command, host=host, port=port, title="lmx", public_url=None)
        self.public_url = f"http://{shown}:{port}"
        self.api_key = api_key

    async def _make_app(self) -> web.Application:
        app = await super()._make_app()
        if self.api_key:
            app.middlewares.append(self._guard)
        return app

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        assert self.api_key is not None
        given = request.query.get("key") or request.cookies.get(KEY_COOKIE) or ""
        auth = request.headers.get("Authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            return web.Response(
                status=401,
                text="lmx: this app needs the API key: open /?key=KEY\n",
                content_type="text/plain",
            )
        response = await handler(request)
        if "key" in request.query:
            response.set_cookie(KEY_COOKIE, given, httponly=True, samesite="Strict")
        return response


def serve_web(config: ConfigStore, host: str, port: int, argv: list[str]) -> None:
    """Serve the app on http://host:port until Ctrl+C."""
    server = LmxWebServer(session_command(argv), host, port, config.current.api_key)
    server.serve()
