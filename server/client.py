"""A client of a running lmx server, for the CLI (as Ollama's CLI talks to `ollama serve`).

`find_server()` answers the server lmx's settings point at (`LMX_HOST`, else host and port
from the config and flags, default 127.0.0.1:8421) when one is there and is lmx.
"""

from __future__ import annotations

import contextlib
import json
import ssl
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx

from server.errors import LmxError
from server.settings import Settings

PROBE_SECONDS = 1.0


class ServerError(LmxError):
    """The server answered with an error; the message is the server's own."""


def base_url(settings: Settings) -> str:
    host = settings.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"  # a wildcard bind is reached on loopback
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if settings.tls_cert is not None else "http"
    return f"{scheme}://{host}:{settings.port}"


def _verify(settings: Settings) -> ssl.SSLContext | bool:
    """Trust the server's own certificate (often self-signed) besides the system's CAs."""
    if settings.tls_cert is None:
        return True
    ctx = ssl.create_default_context()
    with contextlib.suppress(OSError, ssl.SSLError):
        ctx.load_verify_locations(cafile=str(settings.tls_cert))
    return ctx


class LmxClient:
    """The HTTP calls the CLI makes, with errors turned into one-line `ServerError`s."""

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        timeout: float = 600,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, verify=verify)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> LmxClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check(self, r: httpx.Response) -> Any:
        if r.status_code >= 400:
            raise ServerError(_error_text(r.read(), r.status_code))
        return r.json()

    def get(self, path: str, **params: Any) -> Any:
        return self._check(self.http.get(path, params=params or None))

    def post(self, path: str, body: Any = None) -> Any:
        return self._check(self.http.post(path, json=body))

    def delete(self, path: str, body: Any = None) -> Any:
        r = self.http.request("DELETE", path, json=body)
        if r.status_code >= 400:
            raise ServerError(_error_text(r.read(), r.status_code))
        return r.json() if r.content else None

    def load(self, model: str, ctx: int | None = None) -> dict[str, Any]:
        """Load `model` (with this context), waiting for it: the server's `loaded` event."""
        path = f"/admin/models/{quote(model, safe='')}/load"
        params = {"ctx": ctx} if ctx else None
        event = ""
        with self.http.stream("POST", path, params=params) as r:
            if r.status_code >= 400:
                raise ServerError(_error_text(r.read(), r.status_code))
            for line in r.iter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:") and event in ("loaded", "error"):
                    data = json.loads(line[5:])
                    if event == "error":
                        raise ServerError(str(data.get("error", "the load failed")))
                    return dict(data)
        raise ServerError(f"the server ended the load of {model} without an answer")

    def models(self) -> list[dict[str, Any]]:
        return list(self.get("/admin/models")["models"])

    def chat_stream(self, body: dict[str, Any]) -> Iterator[tuple[str, str]]:
        """Deltas of a streamed chat completion: ("answer" | "thinking", text), and at the end
        ("usage", completion tokens) when the server counts them."""
        with self.http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            if r.status_code >= 400:
                raise ServerError(_error_text(r.read(), r.status_code))
            for line in r.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    raise ServerError(str(chunk["error"].get("message", chunk["error"])))
                usage = chunk.get("usage")
                if isinstance(usage, dict) and "completion_tokens" in usage:
                    yield "usage", str(usage["completion_tokens"])
                for choice in chunk.get("choices", []):
                    delta = choice.get("delta", {})
                    if delta.get("reasoning_content"):
                        yield "thinking", str(delta["reasoning_content"])
                    if delta.get("content"):
                        yield "answer", str(delta["content"])


def _error_text(body: bytes, status: int) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return f"the server answered {status}: {body[:200].decode('utf-8', 'replace')}"
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict):
        return str(err.get("message") or err)
    if err:
        return str(err)
    return f"the server answered {status}"


def find_server(settings: Settings) -> LmxClient | None:
    """A client of the lmx server at the configured address, or None when none answers."""
    url = base_url(settings)
    verify = _verify(settings)
    try:
        r = httpx.get(url + "/health", timeout=PROBE_SECONDS, verify=verify)
        ok = r.status_code == 200 and r.json().get("server") == "lmx"
    except (httpx.HTTPError, ValueError, AttributeError):
        return None
    if not ok:
        return None
    # `ls`, `ps`, `pull` and `rm` use the admin API: the admin key when there is one.
    return LmxClient(url, settings.admin_key or settings.api_key, verify=verify)
