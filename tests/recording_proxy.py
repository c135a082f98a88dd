"""A pass-through HTTP proxy that writes down what a real client sent and what lmx answered.

The agent CLIs are separate programs: this is how a test sees every request they made, its
status, and whether each stream ended with its dialect's terminal event. Bytes go through
unchanged (streams chunk by chunk, as they come).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "te", "upgrade"}


@dataclass
class Exchange:
    method: str
    path: str
    status: int
    content_type: str
    request: bytes
    response: bytearray = field(default_factory=bytearray)

    def body(self) -> Any:
        try:
            return json.loads(self.request)
        except ValueError:
            return None

    @property
    def streamed(self) -> bool:
        return self.content_type.startswith("text/event-stream") or "ndjson" in self.content_type

    def events(self) -> list[str]:
        """The SSE event names (or, without names, the data lines) of a streamed answer."""
        text = self.response.decode("utf-8", "replace")
        named = [ln[6:].strip() for ln in text.splitlines() if ln.startswith("event:")]
        return named or [ln[5:].strip() for ln in text.splitlines() if ln.startswith("data:")]

    def ended(self) -> bool:
        """The stream ended with its dialect's terminal event."""
        if not self.streamed:
            return True
        if "ndjson" in self.content_type:
            lines = [ln for ln in self.response.decode().splitlines() if ln.strip()]
            return bool(lines) and json.loads(lines[-1]).get("done") is True
        ev = self.events()
        if not ev:
            return False
        if self.path.startswith("/v1/messages"):
            return ev[-1] == "message_stop"
        if self.path.startswith("/v1/responses"):
            return ev[-1] in ("response.completed", "response.incomplete")
        return ev[-1] == "[DONE]"


class RecordingProxy:
    """Listens on 127.0.0.1, port 0; forwards everything to `upstream`."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.exchanges: list[Exchange] = []
        self._lock = threading.Lock()
        self._http = httpx.Client(timeout=None)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_: Any) -> None:
                pass

            def _forward(self) -> None:
                size = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(size) if size else b""
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
                req = proxy._http.build_request(
                    self.command, proxy.upstream + self.path, headers=headers, content=body
                )
                r = proxy._http.send(req, stream=True)
                ex = Exchange(
                    self.command, self.path, r.status_code, r.headers.get("content-type", ""), body
                )
                with proxy._lock:
                    proxy.exchanges.append(ex)
                try:
                    self.send_response(r.status_code)
                    for k, v in r.headers.items():
                        if k.lower() not in HOP and k.lower() != "content-encoding":
                            self.send_header(k, v)
                    if self.command == "HEAD":
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for chunk in r.iter_raw():
                        ex.response += chunk
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                        self.wfile.flush()
                    self.wfile.write(b"0\r\n\r\n")
                    self.wfile.flush()
                finally:
                    r.close()

            do_GET = do_POST = do_HEAD = do_DELETE = do_PUT = do_PATCH = _forward

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._http.close()

    def __enter__(self) -> RecordingProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def calls(self, prefix: str) -> list[Exchange]:
        with self._lock:
            return [e for e in self.exchanges if e.path.startswith(prefix)]
