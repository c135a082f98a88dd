"""A pass-through HTTP proxy that writes down what a real client sent and what lmx answered.

The agent CLIs are separate programs: this is how a test sees every request they made, its
status, and whether each stream ended with its dialect's terminal event. Bytes go through
unchanged (streams chunk by chunk, as they come).
"""

from __future__ import annotations

import contextlib
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
    done: bool = False  # lmx's whole answer went through (not cut off by the client)

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

    def data(self) -> list[Any]:
        """The JSON payloads of a streamed answer (or the one JSON body of a plain one)."""
        text = self.response.decode("utf-8", "replace")
        if not self.streamed:
            try:
                return [json.loads(text)]
            except ValueError:
                return []
        lines = (
            text.splitlines()
            if "ndjson" in self.content_type
            else [ln[5:].strip() for ln in text.splitlines() if ln.startswith("data:")]
        )
        out = []
        for ln in lines:
            with contextlib.suppress(ValueError):  # [DONE]
                out.append(json.loads(ln))
        return out

    def cut_by_length(self) -> bool:
        """lmx ended the answer at its token limit (each dialect's way of saying so)."""
        for d in self.data():
            if not isinstance(d, dict):
                continue
            resp = d.get("response") or {}
            if (resp.get("incomplete_details") or {}).get("reason") == "max_output_tokens":
                return True  # Responses
            delta = d.get("delta")
            if isinstance(delta, dict) and delta.get("stop_reason") == "max_tokens":
                return True  # Anthropic
            if any(c.get("finish_reason") == "length" for c in d.get("choices") or []):
                return True  # chat completions
        return False

    def tool_calls(self) -> set[str]:
        """The ids of the tool calls lmx answered with, in any dialect."""
        ids: set[str] = set()
        for d in self.data():
            if not isinstance(d, dict):
                continue
            block = d.get("content_block") or {}
            if block.get("type") == "tool_use":  # Anthropic, streamed
                ids.add(block["id"])
            for b in d.get("content") or []:  # Anthropic, whole
                if isinstance(b, dict) and b.get("type") == "tool_use":
                    ids.add(b["id"])
            item = d.get("item") or {}
            if item.get("type") in ("function_call", "custom_tool_call"):  # Responses
                ids.add(item["call_id"])
            for c in d.get("choices") or []:  # chat completions
                for call in (c.get("delta") or c.get("message") or {}).get("tool_calls") or []:
                    if call.get("id"):
                        ids.add(call["id"])
        return ids

    def tool_results(self) -> set[str]:
        """The ids of the tool results the client sent in this request, in any dialect."""
        body = self.body()
        if not isinstance(body, dict):
            return set()
        ids: set[str] = set()
        for m in body.get("messages") or []:
            if m.get("role") == "tool" and m.get("tool_call_id"):
                ids.add(m["tool_call_id"])
            for b in m.get("content") if isinstance(m.get("content"), list) else []:
                if isinstance(b, dict) and b.get("type") == "tool_result":
                    ids.add(b["tool_use_id"])
        items = body.get("input")
        for item in items if isinstance(items, list) else []:
            if item.get("type") in ("function_call_output", "custom_tool_call_output"):
                ids.add(item["call_id"])
        return ids

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
                        ex.done = True
                        return
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for chunk in r.iter_raw():
                        ex.response += chunk
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                        self.wfile.flush()
                    ex.done = True
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

    def unanswered_tool_calls(self, prefix: str) -> set[str]:
        """Tool calls of whole answers that no later request sent back as a tool result,
        except those of the last whole answer (the agent may have stopped there)."""
        calls = self.calls(prefix)
        whole = [e for e in calls if e.done]
        made = set().union(*(e.tool_calls() for e in whole[:-1])) if len(whole) > 1 else set()
        returned = set().union(*(e.tool_results() for e in calls)) if calls else set()
        return made - returned
