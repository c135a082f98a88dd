"""Runs the HTTP app with uvicorn: on the main thread (`--no-ui`) or on a worker thread (TUI)."""

from __future__ import annotations

import errno
import socket
import ssl
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.config import LOGGING_CONFIG

from server.api.app import create_app
from server.runtime import Runtime
from server.settings import Settings

GRACEFUL_SECONDS = 2


class PortInUse(OSError):
    """The address is taken; the message says which."""


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind before starting uvicorn so a taken port is a clear error, and port 0 works."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise PortInUse(
                f"port {port} on {host} is already in use; pick another with --port"
            ) from e
        raise PortInUse(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class LmxServer(uvicorn.Server):
    """uvicorn's server, which also cancels generations the moment a shutdown is asked for,
    so open streams end at once instead of holding the port."""

    def __init__(self, config: uvicorn.Config, rt: Runtime) -> None:
        super().__init__(config)
        self.rt = rt
        self.on_started: Callable[[], None] | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self.on_started is not None:
            self.on_started()  # listening, with uvicorn's signal handlers in place

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.rt.scheduler.cancel_all()
        super().handle_exit(sig, frame)

    def request_stop(self) -> None:
        self.rt.scheduler.cancel_all()
        self.should_exit = True


class TlsError(OSError):
    """The certificate or its key cannot be used; the message says which and why."""


def check_tls(settings: Settings) -> None:
    """Load the certificate and key once before serving, so a bad pair is one clear line."""
    if settings.tls_cert is None or settings.tls_key is None:
        return
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
            settings.tls_cert, settings.tls_key
        )
    except (OSError, ssl.SSLError) as e:
        reason = getattr(e, "strerror", None) or getattr(e, "reason", None) or str(e)
        raise TlsError(
            f"cannot serve HTTPS with {settings.tls_cert} and {settings.tls_key}: {reason}"
        ) from e


def scheme(settings: Settings) -> str:
    return "https" if settings.tls_cert is not None else "http"


def make_server(rt: Runtime, *, log_level: str = "info", own_logging: bool = True) -> LmxServer:
    """uvicorn over the app. `own_logging=False` leaves uvicorn's records to the root logger
    (the TUI routes them to its log pane; uvicorn's own handlers would write to the terminal)."""
    app = create_app(rt)
    s = rt.settings
    check_tls(s)
    config = uvicorn.Config(
        app,
        log_level=log_level,
        log_config=LOGGING_CONFIG if own_logging else None,
        timeout_graceful_shutdown=GRACEFUL_SECONDS,
        lifespan="on",
        access_log=log_level == "debug",
        ssl_certfile=str(s.tls_cert) if s.tls_cert else None,
        ssl_keyfile=str(s.tls_key) if s.tls_key else None,
    )
    return LmxServer(config, rt)


def address(sock: socket.socket) -> tuple[str, int]:
    host, port = sock.getsockname()[:2]
    return str(host), int(port)


class ServerThread:
    """The same server on a worker thread; the caller owns the main thread (TUI, tests)."""

    def __init__(self, rt: Runtime, *, log_level: str = "warning"):
        self.scheme = scheme(rt.settings)
        self.sock = bind_socket(rt.settings.host, rt.settings.port)
        self.host, self.port = address(self.sock)
        try:
            self.server = make_server(rt, log_level=log_level, own_logging=False)
        except BaseException:
            self.sock.close()
            raise
        self.error: BaseException | None = None
        self._started = threading.Event()
        self.server.on_started = self._started.set
        self._thread = threading.Thread(target=self._run, name="lmx-http", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        except BaseException as e:  # uvicorn calls sys.exit on startup failure
            self.error = e
        finally:
            self._started.set()  # wake start(): it reads `started` and the error

    def start(self, timeout: float = 30) -> ServerThread:
        self._thread.start()
        self._started.wait(timeout)
        if not self.server.started:
            raise RuntimeError(f"the HTTP server did not start: {self.error!r}")
        return self

    def stop(self, timeout: float = 10) -> None:
        self.server.request_stop()
        self._thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
