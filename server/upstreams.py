"""Upstream servers: other OpenAI-compatible servers (vLLM, SGLang, llama-server, Ray Serve
LLM's OpenAI app, a LiteLLM proxy, another lmx) whose models lmx lists and forwards requests
to. This is how lmx grows past one machine: it sits in front of them, as llama-swap's peers.

Model ids: an upstream's model is listed as `prefix + its own id`, lowercased (the upstream is
always sent its own id, case kept). Without `models` in its settings, the ids are what its
`/v1/models` lists, asked at start, on every rescan and every PROBE_INTERVAL seconds in the
background. A local model with the same id wins (a warning says so).

An upstream that does not answer keeps its last known models (never reached: one entry named
after it), unusable with "unreachable: ...". A request for one still tries it, since it may be
back, and gets a 502 within CONNECT_TIMEOUT seconds when it is not.

A managed upstream (`cmd`) is never probed while stopped: its listed `models` are available,
the first load of one starts the command and waits until it answers, and it is stopped when
the last of its models is unloaded (keep_alive, eviction, `lmx stop`), as llama-swap does.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from server.discovery import ModelInfo
from server.errors import LmxError, UpstreamError, UpstreamUnavailable
from server.events import EventBus
from server.settings import ConfigStore, Settings, UpstreamConfig, parse_duration, state_dir

log = logging.getLogger(__name__)
# httpx logs every request at INFO: a probe every PROBE_INTERVAL would fill lmx's log.
logging.getLogger("httpx").setLevel(logging.WARNING)

CONNECT_TIMEOUT = 2.0  # a server that is down is known this fast (refused: at once)
PROBE_TIMEOUT = 5.0  # for the model list
PROBE_INTERVAL = 15.0  # background re-probe of every upstream
STOP_TIMEOUT = 10.0  # a managed process gets this long to exit before it is killed
_START_POLL = 0.25


@dataclass(frozen=True)
class UpstreamModel:
    """What an upstream model's `ModelInfo` carries: its server and its id there."""

    server: UpstreamServer
    model: str  # the upstream's own id; "" when the upstream was never reached
    context_length: int | None = None  # as its model list states it (vLLM's max_model_len)
    reachable: bool = True  # at the last probe

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.server.name,
            "url": self.server.url,
            "model": self.model,
            "reachable": self.reachable,
            "managed": self.server.managed,
        }


def error_text(body: bytes) -> tuple[str, str | None]:
    """The message (and the field at fault) of an error body in any common shape: OpenAI's
    `{"error": {...}}`, Ollama's `{"error": "..."}`, FastAPI's `{"detail": ...}`."""
    try:
        data = json.loads(body)
    except ValueError:
        return body[:300].decode("utf-8", "replace").strip() or "(no body)", None
    if isinstance(data, dict):
        err = data.get("error", data.get("detail", data.get("message")))
        if isinstance(err, dict):
            param = err.get("param")
            return str(err.get("message") or err), str(param) if param else None
        if isinstance(err, list) and err and isinstance(err[0], dict):
            return str(err[0].get("msg") or err[0]), None
        if err:
            return str(err), None
    return json.dumps(data)[:300], None


def upstream_error(name: str, status: int, body: bytes) -> LmxError:
    """An upstream's error status, as lmx answers it: the caller's faults keep their 4xx, the
    upstream's own (5xx, lmx's credentials refused) become a gateway error."""
    text, param = error_text(body)
    message = f"upstream {name} answered {status}: {text}"
    if status in (401, 403):
        return UpstreamUnavailable(f"{message} (check its api_key in lmx's settings)")
    if status >= 500 or status == 408:
        return UpstreamError(message, status=503 if status == 503 else 502)
    if status in (404, 413, 429):
        return UpstreamError(message, status=status, param=param)
    return UpstreamError(message, status=400, param=param)


def unreachable(name: str, url: str, e: Exception) -> UpstreamUnavailable:
    """A connection failure in one line (httpx's messages are often empty)."""
    what = str(e) or type(e).__name__
    if isinstance(e, httpx.TimeoutException):
        what = f"no answer in time ({type(e).__name__})"
    return UpstreamUnavailable(f"upstream {name} at {url} does not answer: {what}")


class UpstreamServer:
    """One upstream: its settings, how to reach it, what it answered last, and its process
    when lmx runs it (`cmd`). Thread-safe."""

    def __init__(
        self,
        name: str,
        config: UpstreamConfig,
        *,
        on_change: Callable[[UpstreamServer], None] | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self.url = config.url
        self.known: list[dict[str, Any]] = []  # its model list when last reached
        self.reachable: bool | None = None  # at the last probe; None: never probed
        self.error: str | None = None  # why the last probe failed
        self._on_change = on_change
        self._lock = threading.Lock()
        self._users = 0  # loaded models holding it
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def managed(self) -> bool:
        return self.config.cmd is not None

    @property
    def running(self) -> bool:
        """A managed upstream's process is up (an unmanaged one: always True)."""
        if not self.managed:
            return True
        p = self._process
        return p is not None and p.poll() is None

    @property
    def log_path(self) -> Path:
        return state_dir() / "upstreams" / (re.sub(r"[^\w.-]", "_", self.name) + ".log")

    def headers(self) -> dict[str, str]:
        key = self.config.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def timeout(self) -> httpx.Timeout:
        """Connect fast (a down server answers 502 at once), read as long as generation takes."""
        return httpx.Timeout(self.config.timeout, connect=CONNECT_TIMEOUT)

    # ----- probing -----------------------------------------------------------------------

    def fetch_models(self) -> list[dict[str, Any]]:
        """Its `/models` list; UpstreamUnavailable or UpstreamError say why not."""
        try:
            r = httpx.get(
                self.url + "/models",
                headers=self.headers(),
                timeout=httpx.Timeout(PROBE_TIMEOUT, connect=CONNECT_TIMEOUT),
            )
        except httpx.HTTPError as e:
            raise unreachable(self.name, self.url, e) from e
        if r.status_code != 200:
            raise upstream_error(self.name, r.status_code, r.content)
        try:
            data = r.json()["data"]
            models = [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]
        except (ValueError, KeyError, TypeError) as e:
            raise UpstreamUnavailable(
                f"upstream {self.name} ({self.url}) is not an OpenAI-compatible server: its "
                "/models answer has no model list"
            ) from e
        return models

    def probe(self) -> list[dict[str, Any]]:
        """`fetch_models`, remembering the answer (a change of reachability is reported)."""
        try:
            models = self.fetch_models()
        except LmxError as e:
            self._note(False, e.message)
            raise
        self.known = models
        self._note(True, None)
        return models

    def report(self, failure: LmxError | None) -> None:
        """A request found it down (`failure`) or answering (None): listed so from the next
        catalog refresh, which a change triggers, rather than at the next periodic probe."""
        self._note(failure is None, None if failure is None else failure.message)

    def _note(self, reachable: bool, error: str | None) -> None:
        before = self.reachable
        self.reachable, self.error = reachable, error
        if before is not None and before != reachable and self._on_change is not None:
            self._on_change(self)

    # ----- a managed process -------------------------------------------------------------

    def acquire(self) -> None:
        """Hold the server for a loaded model; the first hold of a managed one starts its
        command and waits until it answers (UpstreamUnavailable if it does not)."""
        with self._lock:
            if self.managed and not self.running:
                self._start()
            self._users += 1

    def release(self) -> None:
        """Let go of a hold; a managed process stops with the last one."""
        with self._lock:
            self._users = max(0, self._users - 1)
            if self._users == 0:
                self._stop()

    def _start(self) -> None:
        assert self.config.cmd is not None
        cmd = self.config.cmd
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as out:
            try:
                # Its own session: stopping it reaches whatever it started (workers).
                self._process = subprocess.Popen(
                    shlex.split(cmd),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except (OSError, ValueError) as e:
                raise UpstreamUnavailable(f"upstream {self.name}: cannot run `{cmd}`: {e}") from e
        log.info("started upstream %s: %s (pid %d)", self.name, cmd, self._process.pid)
        deadline = time.monotonic() + self.config.start_timeout
        while True:
            code = self._process.poll()
            if code is not None:
                self._process = None
                raise UpstreamUnavailable(
                    f"upstream {self.name}: `{cmd}` exited with status {code} before serving; "
                    f"its output is in {self.log_path}"
                )
            try:
                self.known = self.fetch_models()
                self._note(True, None)
                return
            except LmxError:
                pass
            if time.monotonic() > deadline:
                self._stop()
                raise UpstreamUnavailable(
                    f"upstream {self.name}: `{cmd}` did not answer at {self.url} within "
                    f"{self.config.start_timeout:.0f}s; its output is in {self.log_path}"
                )
            time.sleep(_START_POLL)  # a starting server: ask again shortly

    def _stop(self) -> None:
        p, self._process = self._process, None
        if p is None or p.poll() is not None:
            return
        log.info("stopping upstream %s (pid %d)", self.name, p.pid)
        _signal(p, signal.SIGTERM)
        try:
            p.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            _signal(p, signal.SIGKILL)
            p.wait()

    def close(self) -> None:
        """Stop its process whoever holds it (lmx is shutting down)."""
        with self._lock:
            self._users = 0
            self._stop()


def _signal(p: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if hasattr(os, "killpg"):
            os.killpg(p.pid, sig)
        else:  # pragma: no cover - no process groups (Windows)
            p.send_signal(sig)


class Upstreams:
    """Every upstream the settings name: a catalog source (`models`), re-probed in the
    background (`watch`), rebuilt when their settings change."""

    def __init__(
        self,
        config: ConfigStore,
        events: EventBus | None = None,
        *,
        interval: float = PROBE_INTERVAL,
    ) -> None:
        self.config = config
        self.events = events
        self.interval = interval
        self._lock = threading.Lock()
        self._servers: dict[str, UpstreamServer] = {}
        self._retired: list[UpstreamServer] = []  # replaced, maybe still running for a model
        self._refresh: Callable[[], object] | None = None
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self._unsubscribe = config.subscribe(self._on_config)

    def servers(self) -> dict[str, UpstreamServer]:
        """The upstreams the current settings name, by name (one is made anew when its
        settings change; a model loaded from the old one keeps it until unloaded)."""
        configs = self.config.current.upstream_configs()
        with self._lock:
            for name, cfg in configs.items():
                old = self._servers.get(name)
                if old is None or old.config != cfg:
                    if old is not None:
                        self._retired.append(old)
                    self._servers[name] = UpstreamServer(name, cfg, on_change=self._changed)
            for name in [n for n in self._servers if n not in configs]:
                self._retired.append(self._servers.pop(name))
            self._retired = [s for s in self._retired if s.running and s.managed]
            return dict(self._servers)

    def models(self) -> list[ModelInfo]:
        """Every upstream's models (the catalog source). Upstreams are probed in parallel, so
        this takes PROBE_TIMEOUT at most, however many are down."""
        servers = list(self.servers().values())
        if not servers:
            return []
        with ThreadPoolExecutor(len(servers), thread_name_prefix="lmx-probe") as pool:
            lists = list(pool.map(self._models_of, servers))
        return [m for ms in lists for m in ms]

    def _models_of(self, server: UpstreamServer) -> list[ModelInfo]:
        cfg = server.config
        error: str | None = None
        if server.managed and not server.running:
            listed: list[dict[str, Any]] = []  # started on first use: never probed while off
        else:
            try:
                listed = server.probe()
            except LmxError as e:
                listed, error = server.known, e.message
        by_id = {str(m["id"]): m for m in listed}
        ids = list(cfg.models) if cfg.models else list(by_id)
        keep_alive = parse_duration(cfg.keep_alive) if cfg.keep_alive is not None else None
        if not ids:
            if error is None:
                return []  # reached, and it serves nothing
            ids = [""]  # never reached: one entry, named after it, says so
        out = []
        for mid in ids:
            ref = UpstreamModel(server, mid, _context_of(by_id.get(mid)), error is None)
            out.append(
                ModelInfo(
                    id=(cfg.prefix + (mid or server.name)).lower(),
                    path=Path(server.url),  # a stand-in: describe() shows the URL
                    source="upstream",
                    size_bytes=0,
                    error=None if error is None else f"unreachable: {error}",
                    format="upstream",
                    upstream=ref,
                    keep_alive=keep_alive,
                )
            )
        return out

    # ----- the background probe ----------------------------------------------------------

    def watch(self, refresh: Callable[[], object]) -> None:
        """Call `refresh` (the catalog's, which probes again through `models`) every
        `interval` seconds while upstreams are configured, and soon after one goes down or
        comes back."""
        self._refresh = refresh
        self._start_thread()

    def wake(self) -> None:
        """Probe again now (a request found an upstream down)."""
        self._wake.set()

    def _changed(self, server: UpstreamServer) -> None:
        if self.events is not None:
            kind = "upstream_up" if server.reachable else "upstream_down"
            self.events.publish(kind, "", upstream=server.name, url=server.url, error=server.error)
        log.warning(
            "upstream %s (%s) is %s",
            server.name,
            server.url,
            "back" if server.reachable else f"down: {server.error}",
        )
        self.wake()

    def _start_thread(self) -> None:
        with self._lock:
            if self._thread is not None or self._refresh is None or self._closed.is_set():
                return
            if not self.config.current.upstream_configs():
                return
            self._thread = threading.Thread(target=self._loop, name="lmx-upstreams", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            self._wake.wait(self.interval)
            self._wake.clear()
            if self._closed.is_set():
                return
            try:
                assert self._refresh is not None
                self._refresh()
            except Exception:
                log.exception("probing the upstreams failed")

    def _on_config(self, old: Settings, new: Settings) -> None:
        if old.upstream_configs() != new.upstream_configs():
            self._start_thread()
            self.wake()

    def close(self) -> None:
        """Stop probing and stop every managed process."""
        self._closed.set()
        self._wake.set()
        self._unsubscribe()
        with self._lock:
            thread, self._thread = self._thread, None
            servers = [*self._servers.values(), *self._retired]
        if thread is not None:
            thread.join(PROBE_TIMEOUT + 1)
        for s in servers:
            s.close()


def _context_of(card: dict[str, Any] | None) -> int | None:
    if not card:
        return None
    for key in ("max_model_len", "context_length", "context_window", "max_context_length"):
        v = card.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None
