"""Saved KV states of prompt prefixes, kept across slot reuse and model unloads.

One store per lmx process, shared by every loaded model. An entry is the serialized KV state of
one sequence (llama.cpp's `llama_state_seq_get_data`) plus the tokens it holds, filed under a
model key: the model file's identity and the load settings that shape the KV bytes. Entries live
in RAM up to a cap (the scheduler lowers it when models need the memory), spill to a directory
on disk up to a second cap, and go least recently used first. Disk entries survive a restart.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import struct
import threading
import time
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_MAGIC = b"LMXKV001"
_SUFFIX = ".kvstate"
_TOKEN = "i"  # int32, as llama_token


def _token_bytes(tokens: Sequence[int]) -> bytes:
    return array(_TOKEN, tokens).tobytes()


def common_prefix_bytes(a: bytes, b: bytes, width: int = 4) -> int:
    """How many leading `width`-byte items two buffers share (memcmp speed, not Python loops)."""
    n = min(len(a), len(b)) // width
    if a[: n * width] == b[: n * width]:
        return n
    lo, hi = 0, n  # a[:lo] matches, a[:hi] does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[: mid * width] == b[: mid * width]:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass
class _Entry:
    key: str  # model key
    name: str  # file stem: model key + token digest
    tokens: bytes  # int32 tokens the state holds
    n_tokens: int
    min_keep: int  # a restore may be cut to any length >= this (sliding-window caches: the whole)
    size: int  # bytes of state
    state: bytearray | None = None  # in RAM
    path: Path | None = None  # on disk


@dataclass(frozen=True)
class PrefixMatch:
    """The stored prefix that serves a prompt best: `usable` of its tokens apply."""

    name: str
    tokens: list[int]
    usable: int
    min_keep: int


@dataclass(frozen=True)
class PrefixStoreStats:
    """What the store holds and how it has served: for the budget, /metrics and the TUI."""

    ram_bytes: int
    disk_bytes: int
    ram_entries: int
    disk_entries: int
    ram_limit: int
    ram_cap: int
    disk_limit: int
    hits: int
    misses: int
    saved: int
    restored_tokens: int
    spilled: int
    dropped: int

    @property
    def entries(self) -> int:
        return self.ram_entries + self.disk_entries

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["entries"] = self.entries
        return d


class PrefixStore:
    """Prompt-prefix KV states in host RAM (bounded) spilling to disk (bounded). Thread-safe."""

    def __init__(self, ram_limit: int, disk_dir: Path | None = None, disk_limit: int = 0) -> None:
        self.ram_limit = max(0, ram_limit)
        self._ram_cap = self.ram_limit
        self.disk_dir = disk_dir if disk_dir is not None and disk_limit > 0 else None
        self.disk_limit = disk_limit if self.disk_dir is not None else 0
        self._lock = threading.RLock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._ram = 0
        self._disk = 0
        self.hits = 0
        self.misses = 0
        self.saved = 0
        self.restored_tokens = 0
        self.spilled = 0
        self.dropped = 0
        if self.disk_dir is not None:
            self._index_disk()

    # ----- what the scheduler reads and sets ---------------------------------------------------

    @property
    def ram_bytes(self) -> int:
        return self._ram

    @property
    def disk_bytes(self) -> int:
        return self._disk

    @property
    def ram_cap(self) -> int:
        """The RAM the store may use now: its limit, or less while models need the room."""
        return self._ram_cap

    def set_ram_cap(self, cap: int, limit: int | None = None) -> None:
        """Use at most min(limit, cap) bytes of RAM from now on (`limit`: a new limit, as
        when the budget changes); spills or drops what is over."""
        with self._lock:
            if limit is not None:
                self.ram_limit = max(0, limit)
            self._ram_cap = max(0, min(self.ram_limit, cap))
            self._fit()

    def stats(self) -> PrefixStoreStats:
        with self._lock:
            return PrefixStoreStats(
                ram_bytes=self._ram,
                disk_bytes=self._disk,
                ram_entries=sum(1 for e in self._entries.values() if e.state is not None),
                disk_entries=sum(1 for e in self._entries.values() if e.state is None),
                ram_limit=self.ram_limit,
                ram_cap=self._ram_cap,
                disk_limit=self.disk_limit,
                hits=self.hits,
                misses=self.misses,
                saved=self.saved,
                restored_tokens=self.restored_tokens,
                spilled=self.spilled,
                dropped=self.dropped,
            )

    @property
    def enabled(self) -> bool:
        return self.ram_limit > 0 or self.disk_limit > 0

    # ----- what an engine calls ------------------------------------------------------------------

    def covers(self, key: str, tokens: Sequence[int]) -> bool:
        """An entry already holds `tokens` (or a longer run starting with them)."""
        want = _token_bytes(tokens)
        with self._lock:
            for e in self._entries.values():
                if (
                    e.key == key
                    and e.n_tokens >= len(tokens)
                    and e.tokens.startswith(want)
                    and (e.min_keep <= len(tokens) or e.n_tokens == len(tokens))
                ):
                    return True
        return False

    def put(self, key: str, tokens: Sequence[int], state: bytearray, *, min_keep: int = 0) -> bool:
        """Keep `state` (the KV of `tokens`) for `key`. False when it cannot be kept anywhere."""
        if not tokens or not state:
            return False
        data = _token_bytes(tokens)
        name = f"{key}-{hashlib.sha1(data).hexdigest()[:20]}"
        entry = _Entry(key, name, data, len(tokens), min_keep, len(state), state=state)
        with self._lock:
            if entry.size > max(self._ram_cap, self.disk_limit):
                return False
            old = self._entries.pop(name, None)
            if old is not None:
                self._forget(old)
            # An entry that a longer one extends adds nothing when the longer one may be cut.
            if min_keep == 0:
                for other in [e for e in self._entries.values() if e.key == key]:
                    if other.n_tokens < entry.n_tokens and data.startswith(other.tokens):
                        self._entries.pop(other.name)
                        self._forget(other)
            self._entries[name] = entry
            self._ram += entry.size
            self.saved += 1
            self._fit()
            return name in self._entries

    def lookup(self, key: str, prompt: Sequence[int]) -> PrefixMatch | None:
        """The entry sharing the longest usable prefix with `prompt`, or None."""
        want = _token_bytes(prompt)
        best: _Entry | None = None
        best_n = 0
        with self._lock:
            for e in self._entries.values():
                if e.key != key:
                    continue
                n = common_prefix_bytes(e.tokens, want)
                if n < e.min_keep:
                    continue
                if n > best_n or (n == best_n and best is not None and e.state is not None):
                    best, best_n = e, n
            if best is None or best_n == 0:
                return None
            toks = array(_TOKEN)
            toks.frombytes(best.tokens)
            return PrefixMatch(best.name, toks.tolist(), best_n, best.min_keep)

    def load(self, match: PrefixMatch) -> bytearray | None:
        """The state bytes of a matched entry (read from disk if spilled), or None if gone."""
        with self._lock:
            e = self._entries.get(match.name)
            if e is None:
                return None
            self._entries.move_to_end(match.name)
            if e.state is not None:
                return e.state
            path = e.path
        assert path is not None
        try:
            state = _read_state(path)
        except (OSError, ValueError) as err:
            log.warning("prompt cache entry %s unreadable, dropped: %s", path.name, err)
            with self._lock:
                if self._entries.pop(match.name, None) is not None:
                    self._forget(e)
            return None
        with self._lock:
            # Back in RAM while it is in use; it stays on disk too, so spilling it is free.
            if match.name in self._entries and e.state is None and e.size <= self._ram_cap:
                e.state = state
                self._ram += e.size
                self._fit(keep=match.name)
        return state

    def record(self, hit: bool, tokens: int = 0) -> None:
        """Count a lookup's outcome: a restore of `tokens` tokens, or a miss."""
        with self._lock:
            if hit:
                self.hits += 1
                self.restored_tokens += tokens
            else:
                self.misses += 1

    def discard(self, match: PrefixMatch) -> None:
        """Forget an entry that could not be restored (a stale or foreign state)."""
        with self._lock:
            e = self._entries.pop(match.name, None)
            if e is not None:
                self._forget(e)

    def clear(self) -> None:
        """Forget everything, on disk too."""
        with self._lock:
            for e in list(self._entries.values()):
                self._forget(e)
            self._entries.clear()

    def close(self, max_seconds: float = 10.0) -> None:
        """Write what is only in RAM to disk for the next run, most recent first, as far as the
        disk cap allows and for at most `max_seconds` (a shutdown must not hang on a big cache).
        """
        deadline = time.monotonic() + max_seconds
        with self._lock:
            if self.disk_dir is None:
                return
            for e in reversed(list(self._entries.values())):
                if time.monotonic() > deadline:
                    log.info("prompt cache: left the rest in RAM after %.0fs", max_seconds)
                    return
                if e.state is not None and e.path is None:
                    if self._disk + e.size > self.disk_limit:
                        continue
                    self._write(e)

    # ----- internals (hold the lock) ------------------------------------------------------

    def _forget(self, e: _Entry) -> None:
        if e.state is not None:
            self._ram -= e.size
            e.state = None
        if e.path is not None:
            with contextlib.suppress(OSError):
                e.path.unlink()
            self._disk -= e.size
            e.path = None

    def _fit(self, keep: str = "") -> None:
        """Spill least recently used RAM entries to disk (or drop them) until under the caps."""
        for e in list(self._entries.values()):
            if self._ram <= self._ram_cap:
                break
            if e.state is None or e.name == keep:
                continue
            if e.path is None and self.disk_dir is not None and e.size <= self.disk_limit:
                self._make_disk_room(e.size)
                self._write(e)
            if e.path is not None:
                self._ram -= e.size
                e.state = None
                self.spilled += 1
            else:
                self._entries.pop(e.name)
                self._forget(e)
                self.dropped += 1
        self._make_disk_room(0)

    def _make_disk_room(self, need: int) -> None:
        for e in list(self._entries.values()):
            if self._disk + need <= self.disk_limit:
                return
            if e.path is None:
                continue
            with contextlib.suppress(OSError):
                e.path.unlink()
            self._disk -= e.size
            e.path = None
            if e.state is None:
                self._entries.pop(e.name)
                self.dropped += 1

    def _write(self, e: _Entry) -> None:
        assert self.disk_dir is not None and e.state is not None
        path = self.disk_dir / (e.name + _SUFFIX)
        header = json.dumps(
            {"key": e.key, "n_tokens": e.n_tokens, "min_keep": e.min_keep, "size": e.size}
        ).encode()
        tmp = path.with_suffix(".partial")
        try:
            self.disk_dir.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(_MAGIC + struct.pack("<I", len(header)) + header)
                f.write(e.tokens)
                f.write(e.state)
            tmp.replace(path)
        except OSError as err:
            log.warning("prompt cache: cannot write %s: %s", path, err)
            with contextlib.suppress(OSError):
                tmp.unlink()
            return
        e.path = path
        self._disk += e.size

    def _index_disk(self) -> None:
        """Pick up the entries a previous run left (headers and tokens only, not the states)."""
        assert self.disk_dir is not None
        try:
            files = sorted(self.disk_dir.glob("*" + _SUFFIX), key=lambda p: p.stat().st_mtime)
        except OSError:
            return
        for path in files:
            try:
                with open(path, "rb") as f:
                    head = _read_header(f)
                    tokens = f.read(4 * int(head["n_tokens"]))
                size = int(head["size"])
                if len(tokens) != 4 * int(head["n_tokens"]) or path.stat().st_size < size:
                    raise ValueError("truncated")
            except (OSError, ValueError, KeyError) as err:
                log.info("prompt cache: ignoring %s (%s)", path.name, err)
                with contextlib.suppress(OSError):
                    path.unlink()
                continue
            e = _Entry(
                str(head["key"]),
                path.name[: -len(_SUFFIX)],
                tokens,
                int(head["n_tokens"]),
                int(head["min_keep"]),
                size,
                path=path,
            )
            self._entries[e.name] = e
            self._disk += size
        self._make_disk_room(0)
        for p in self.disk_dir.glob("*.partial"):  # a write a crash cut short
            with contextlib.suppress(OSError):
                if time.time() - p.stat().st_mtime > 60:
                    os.unlink(p)


def _read_header(f: Any) -> dict[str, Any]:
    magic = f.read(len(_MAGIC))
    if magic != _MAGIC:
        raise ValueError("not a prompt cache file")
    (n,) = struct.unpack("<I", f.read(4))
    head: dict[str, Any] = json.loads(f.read(n))
    return head


def _read_state(path: Path) -> bytearray:
    with open(path, "rb") as f:
        head = _read_header(f)
        f.seek(4 * int(head["n_tokens"]), os.SEEK_CUR)
        state = bytearray(int(head["size"]))
        if f.readinto(state) != len(state):
            raise ValueError("truncated")
    return state
