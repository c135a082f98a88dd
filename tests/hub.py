"""A small stand-in for the Hugging Face hub: the routes huggingface_hub and lmx call, serving
real files (the GGUF models) with the hub's headers. It can cut a transfer or corrupt bytes."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class HubFile:
    path: Path | None  # None: listed only (split shards used in listing tests)
    size: int
    sha256: str


@dataclass
class FakeHub:
    repos: dict[str, dict[str, HubFile]] = field(default_factory=dict)
    downloads: dict[str, int] = field(default_factory=dict)
    likes: dict[str, int] = field(default_factory=dict)
    cut_after: int | None = None  # the next GET stops after this many bytes
    corrupt: bool = False  # flip a byte in every GET
    ranges: list[int] = field(default_factory=list)  # the start offset of every GET
    delay: float = 0.0  # seconds slept per 64 KiB sent: a slow link
    auth: list[str | None] = field(default_factory=list)  # Authorization of every file GET
    server: ThreadingHTTPServer | None = None

    def add(self, repo: str, name: str, path: Path | None, size: int = 0) -> None:
        if path is not None:
            h = hashlib.sha256()
            with path.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            self.repos.setdefault(repo, {})[name] = HubFile(
                path, path.stat().st_size, h.hexdigest()
            )
        else:
            self.repos.setdefault(repo, {})[name] = HubFile(None, size, "0" * 64)

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _json(self, obj: Any, status: int = 200) -> None:
                body = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _not_found(self, what: str) -> None:
                body = json.dumps({"error": f"{what} not found"}).encode()
                self.send_response(404)
                self.send_header("Content-Type", "application/json")
                self.send_header("X-Error-Code", "RepoNotFound")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                self._handle(head=False)

            def do_HEAD(self) -> None:
                self._handle(head=True)

            def _handle(self, head: bool) -> None:
                u = urlparse(self.path)
                parts = [unquote(p) for p in u.path.strip("/").split("/")]
                if parts[:2] == ["api", "models"] and len(parts) == 2:
                    return self._search(parse_qs(u.query))
                if parts[:2] == ["api", "models"] and len(parts) >= 4:
                    repo = "/".join(parts[2:4])
                    return self._info(repo)
                if len(parts) >= 5 and parts[2] == "resolve":
                    repo, name = "/".join(parts[:2]), "/".join(parts[4:])
                    return self._file(repo, name, head)
                return self._not_found(u.path)

            def _search(self, q: dict[str, list[str]]) -> None:
                text = (q.get("search") or [""])[0].lower()
                rows = [
                    {
                        "id": r,
                        "modelId": r,
                        "downloads": hub.downloads.get(r, 0),
                        "likes": hub.likes.get(r, 0),
                        "tags": ["gguf"],
                        "createdAt": "2025-01-01T00:00:00.000Z",
                    }
                    for r in hub.repos
                    if text in r.lower()
                ]
                key = (q.get("sort") or ["downloads"])[0]
                rows.sort(key=lambda r: -int(r.get(key, 0) or 0))
                limit = int((q.get("limit") or ["50"])[0])
                self._json(rows[:limit])

            def _info(self, repo: str) -> None:
                files = hub.repos.get(repo)
                if files is None:
                    return self._not_found(repo)
                siblings = [
                    {
                        "rfilename": n,
                        "size": f.size,
                        "lfs": {"sha256": f.sha256, "size": f.size, "pointerSize": 134},
                    }
                    for n, f in files.items()
                ]
                self._json(
                    {
                        "id": repo,
                        "modelId": repo,
                        "sha": COMMIT,
                        "siblings": siblings,
                        "downloads": hub.downloads.get(repo, 0),
                        "likes": 0,
                        "tags": ["gguf"],
                        "private": False,
                    }
                )

            def _file(self, repo: str, name: str, head: bool) -> None:
                f = hub.repos.get(repo, {}).get(name)
                if f is None or f.path is None:
                    return self._not_found(f"{repo}/{name}")
                start = 0
                rng = self.headers.get("Range")
                if rng and rng.startswith("bytes="):
                    start = int(rng[6:].split("-")[0] or 0)
                if start >= f.size and f.size:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{f.size}")
                    self.end_headers()
                    return
                self.send_response(206 if start else 200)
                self.send_header("ETag", f'"{f.sha256}"')
                self.send_header("X-Linked-Etag", f'"{f.sha256}"')
                self.send_header("X-Linked-Size", str(f.size))
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(f.size - start))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{f.size - 1}/{f.size}")
                self.end_headers()
                if head:
                    return
                hub.ranges.append(start)
                hub.auth.append(self.headers.get("Authorization"))
                cut, hub.cut_after = hub.cut_after, None
                sent = 0
                with f.path.open("rb") as src:
                    src.seek(start)
                    for chunk in iter(lambda: src.read(1 << 16), b""):
                        if hub.corrupt and sent == 0:
                            chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
                        if cut is not None and sent + len(chunk) > cut:
                            self.wfile.write(chunk[: cut - sent])
                            self.wfile.flush()
                            self.close_connection = True
                            return
                        self.wfile.write(chunk)
                        sent += len(chunk)
                        if hub.delay:
                            time.sleep(hub.delay)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
