"""API keys: who may call what, and how much.

Keys come from `api_key` (scope `inference`; `admin` too when no admin key is set, as before
scopes existed), `admin_key` (scope `admin`: everything) and `api_key_file`, a file of named
keys, one per line, re-read when it changes:

    # name: key [scope=inference|admin] [max_concurrent=N] [max_tokens=N]
    alice: sk-alice-1234 scope=admin
    bot-fleet: sk-bots-5678 max_concurrent=2 max_tokens=256

`[keys.NAME]` in the config sets the scope and limits of a key by name (the built-in keys are
named `api` and `admin`); `key_max_concurrent` / `key_max_tokens` are the defaults for keys
without their own. Only a SHA-256 of each key is kept in memory and keys are compared in
constant time; a key is never logged, only its name.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from server.errors import RateLimited
from server.settings import ConfigError, ConfigStore, Settings

log = logging.getLogger(__name__)

Scope = Literal["inference", "admin"]
SCOPES: tuple[Scope, ...] = ("inference", "admin")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
RETRY_AFTER_SECONDS = 1


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8")).digest()


class KeyCounter:
    """Requests in flight for one key name; kept across key-file reloads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.active = 0

    def enter(self, limit: int | None, name: str) -> Permit:
        """A permit for one more request, or RateLimited when `limit` are already running."""
        with self._lock:
            if limit and self.active >= limit:
                raise RateLimited(
                    f"The key '{name}' may run {limit} request{'s' if limit != 1 else ''} at "
                    "once and that many are running; retry when one finishes.",
                    retry_after=RETRY_AFTER_SECONDS,
                )
            self.active += 1
        return Permit(self)

    def _leave(self) -> None:
        with self._lock:
            self.active = max(0, self.active - 1)


class Permit:
    """One running request's share of its key's concurrency; `release()` is idempotent."""

    def __init__(self, counter: KeyCounter) -> None:
        self._counter: KeyCounter | None = counter

    def release(self) -> None:
        counter, self._counter = self._counter, None
        if counter is not None:
            counter._leave()


@dataclass(frozen=True)
class ApiKey:
    """One key by name: its scope and limits (never the key itself, only its digest)."""

    name: str
    scope: Scope
    digest: bytes = field(repr=False)
    max_concurrent: int | None = None  # requests at once; None or 0: no limit
    max_tokens: int | None = None  # per request; None or 0: no cap
    counter: KeyCounter = field(default_factory=KeyCounter, repr=False, compare=False)

    def allows(self, scope: Scope) -> bool:
        return self.scope == "admin" or scope == "inference"

    def enter(self) -> Permit:
        """Count one running request against `max_concurrent` (RateLimited when over)."""
        return self.counter.enter(self.max_concurrent, self.name)


# The key of the HTTP request being served, set by the API's guard. Every dialect's adapter
# builds its GenerateRequest in the same task, so the pipeline reads it from here instead of
# each adapter passing it along.
current_key: contextvars.ContextVar[ApiKey | None] = contextvars.ContextVar(
    "lmx_current_key", default=None
)


def parse_key_file(text: str, source: str = "key file") -> list[tuple[str, str, dict[str, str]]]:
    """`name: key [option=value ...]` lines -> (name, key, options); ConfigError names the line
    (never the key)."""
    out: list[tuple[str, str, dict[str, str]]] = []
    names: set[str] = set()
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, rest = line.partition(":")
        name = name.strip()
        parts = rest.split()
        if not sep or not parts:
            raise ConfigError(f"{source} line {n}: expected 'name: key'")
        if not _NAME.fullmatch(name):
            raise ConfigError(
                f"{source} line {n}: key name {name[:40]!r} must be letters, digits, '_.@-'"
            )
        if name in names:
            raise ConfigError(f"{source} line {n}: the name {name!r} is used twice")
        names.add(name)
        options: dict[str, str] = {}
        for opt in parts[1:]:
            k, eq, v = opt.partition("=")
            if not eq or k not in ("scope", "max_concurrent", "max_tokens"):
                raise ConfigError(
                    f"{source} line {n}: unknown option {k[:40]!r} "
                    "(scope=, max_concurrent=, max_tokens=)"
                )
            options[k] = v
        out.append((name, parts[0], options))
    return out


def _limit(value: object, what: str) -> int | None:
    if value is None:
        return None
    try:
        n = int(str(value))
    except ValueError:
        raise ConfigError(f"{what} must be a whole number, not {value!r}") from None
    if n < 0:
        raise ConfigError(f"{what} must be 0 (no limit) or more, not {n}")
    return n or None


class KeyStore:
    """Every key lmx accepts, rebuilt when the settings or the key file change. Thread-safe."""

    def __init__(self, config: ConfigStore) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._counters: dict[str, KeyCounter] = {}
        self._keys: list[ApiKey] = []
        self._file_stamp: tuple[int, int, int] | None = None
        self._built_for: Settings | None = None
        self._reload(config.current)  # a bad key file fails the start, with its line

    @property
    def enabled(self) -> bool:
        """Whether any key is set (else every route is open, as on a loopback-only server)."""
        return bool(self.all())

    def all(self) -> list[ApiKey]:
        self._refresh()
        with self._lock:
            return list(self._keys)

    def identify(self, given: str | None) -> ApiKey | None:
        """The key `given` is, or None. Compares against every key, in constant time each."""
        if not given:
            return None
        want = _digest(given)
        found = None
        for key in self.all():
            if hmac.compare_digest(want, key.digest):
                found = key  # no early exit: the time does not depend on which key matched
        return found

    def _refresh(self) -> None:
        s = self.config.current
        stamp = _stamp(s.api_key_file)
        if s is self._built_for and stamp == self._file_stamp:
            return
        try:
            self._reload(s)
        except ConfigError as e:
            log.error("API keys not reloaded, the old ones stay: %s", e)
            with self._lock:
                self._built_for, self._file_stamp = s, stamp

    def _reload(self, s: Settings) -> None:
        stamp = _stamp(s.api_key_file)
        entries: list[tuple[str, str, dict[str, str]]] = []
        if s.api_key:
            # Alone, the one key grants everything, as it did before scopes.
            scope = "inference" if (s.admin_key or s.api_key_file) else "admin"
            entries.append(("api", s.api_key, {"scope": scope}))
        if s.admin_key:
            entries.append(("admin", s.admin_key, {"scope": "admin"}))
        if s.api_key_file is not None:
            path = Path(s.api_key_file).expanduser()
            try:
                text = path.read_text("utf-8")
            except (OSError, UnicodeDecodeError) as e:
                reason = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
                raise ConfigError(f"cannot read the key file {path}: {reason or e}") from e
            for name, secret, opts in parse_key_file(text, f"key file {path}"):
                if name in ("api", "admin") and any(n == name for n, _, _ in entries):
                    raise ConfigError(f"key file {path}: {name!r} is the name of --{name}-key")
                entries.append((name, secret, opts))
        keys = []
        for name, secret, opts in entries:
            cfg = s.keys.get(name)
            scope = opts.get("scope") or (cfg.scope if cfg and cfg.scope else "inference")
            if scope not in SCOPES:
                raise ConfigError(f"key {name!r}: scope must be inference or admin, not {scope!r}")
            conc = _limit(opts.get("max_concurrent"), f"key {name!r} max_concurrent")
            cap = _limit(opts.get("max_tokens"), f"key {name!r} max_tokens")
            if conc is None and "max_concurrent" not in opts:
                conc = (cfg.max_concurrent if cfg else None) or s.key_max_concurrent or None
            if cap is None and "max_tokens" not in opts:
                cap = (cfg.max_tokens if cfg else None) or s.key_max_tokens or None
            with self._lock:
                counter = self._counters.setdefault(name, KeyCounter())
            keys.append(ApiKey(name, scope, _digest(secret), conc, cap, counter))
        with self._lock:
            self._keys = keys
            self._built_for, self._file_stamp = s, stamp
        if s.api_key_file is not None:
            log.info("API keys: %s", ", ".join(f"{k.name} ({k.scope})" for k in keys) or "none")


def _stamp(path: Path | None) -> tuple[int, int, int] | None:
    if path is None:
        return None
    try:
        st = os.stat(Path(path).expanduser())
    except OSError:
        return (0, 0, 0)
    return (st.st_mtime_ns, st.st_size, st.st_ino)
