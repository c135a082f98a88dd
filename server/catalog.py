"""The catalog: every available model (found without loading weights), ids, aliases, presets,
groups, and content digests. It knows nothing of what is loaded (that is the scheduler)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from server.discovery import ModelInfo, discover, resolve_name
from server.errors import InvalidRequest, LmxError, ModelNotFound
from server.settings import ConfigStore, PresetConfig, Settings, state_dir

log = logging.getLogger(__name__)

_HEX64 = re.compile(r"(?:sha256-)?([0-9a-f]{64})")


@dataclass(frozen=True)
class Target:
    """What a request's model name means: the model, and the preset laid over it (if any)."""

    info: ModelInfo
    preset: PresetConfig | None = None


class Catalog:
    """Every available model, rescanned on demand; resolution of user-supplied names."""

    def __init__(
        self,
        config: ConfigStore,
        *,
        sources: Iterable[Callable[[], list[ModelInfo]]] = (),
        discover_files: bool = True,
    ) -> None:
        self.config = config
        self._sources = list(sources)  # more models: upstream servers, tests' fakes
        self._discover_files = discover_files
        self._lock = threading.Lock()
        self._models: dict[str, ModelInfo] = {}
        self._stamps: dict[str, FileStamp] = {}  # model id -> its file as last read
        self._broken: dict[str, str] = {}  # model id -> why its chat template is broken
        self._files: list[ModelInfo] | None = None  # the last file scan
        self._digests = DigestCache(state_dir() / "digests.json")
        # Whether a model is loaded (the runtime points it at the scheduler): a loaded model's
        # file may change under it; the catalog follows only once it is unloaded.
        self.in_use: Callable[[str], bool] = lambda model_id: False
        self.refresh()

    @property
    def settings(self) -> Settings:
        return self.config.current

    def refresh(self, *, files: bool = True) -> list[ModelInfo]:
        """Rescan every source (loaded models stay loaded: the scheduler holds them).
        `files=False` asks only the extra sources again (the upstreams' background probe)."""
        s = self.settings
        if files or self._files is None:
            self._files = (
                discover(
                    s.model_dirs,
                    include_default=s.include_default_model,
                    include_hf_cache=s.hf_cache,
                    hf_cache_dir=s.hf_cache_dir,
                    include_user_stores=s.user_stores,
                    ollama_dir=s.ollama_dir,
                    lmstudio=s.lmstudio_dirs,
                )
                if self._discover_files
                else []
            )
        found = list(self._files)
        for source in self._sources:
            found += source()
        models: dict[str, ModelInfo] = {}
        for m in found:
            if m.id in models:  # a local model keeps its id; an upstream's twin is left out
                log.warning(
                    "%s from %s is hidden by the one from %s", m.id, m.source, models[m.id].source
                )
                continue
            models[m.id] = m
        stamps = {
            mid: st
            for mid, m in models.items()
            if m.format == "gguf" and (st := file_stamp(m.path))
        }
        with self._lock:
            before, old_stamps = dict(self._models), dict(self._stamps)
        for mid, old in before.items():  # in_use() asks the scheduler: not under our lock
            if mid not in models and self.in_use(mid):
                # Deleted while loaded: it serves from memory until unloaded, so it stays
                # listed (with its old file's stamp) until then.
                models[mid] = old
                if mid in old_stamps:
                    stamps[mid] = old_stamps[mid]
        with self._lock:
            for mid in list(self._broken):
                if stamps.get(mid) != self._stamps.get(mid):
                    del self._broken[mid]  # a new file: its template gets a fresh chance
            self._models = models
            self._stamps = stamps
        return list(models.values())

    def _rescan_if_changed(self) -> None:
        """Rescan when a model file was deleted or replaced since it was read (the loaded copy,
        mapped in memory, keeps serving until it is unloaded; the next load reads the new one)."""
        with self._lock:
            known = list(self._stamps.items())
            paths = {m.id: m.path for m in self._models.values()}
        changed = [mid for mid, st in known if mid in paths and file_stamp(paths[mid]) != st]
        if any(not self.in_use(mid) for mid in changed):
            log.info("a model file changed on disk; rescanning")
            self.refresh()

    def models(self) -> list[ModelInfo]:
        self._rescan_if_changed()
        with self._lock:
            return list(self._models.values())

    def mark_broken(self, model_id: str, reason: str) -> None:
        """Mark a model's chat template broken (it failed, ran too long or wrote too much);
        shown by `lmx ls`, the admin API and the TUI until the file changes."""
        with self._lock:
            first = model_id not in self._broken
            self._broken[model_id] = reason
        if first:
            log.warning("the chat template of %s is broken: %s", model_id, reason)

    def broken(self, model_id: str) -> str | None:
        """Why the model's chat template is marked broken, or None."""
        with self._lock:
            return self._broken.get(model_id)

    def get(self, model_id: str) -> ModelInfo | None:
        with self._lock:
            return self._models.get(model_id)

    def resolve(self, name: str) -> ModelInfo:
        """The model a user-supplied name (id, alias, unique prefix, `name:tag`) refers to."""
        self._rescan_if_changed()
        with self._lock:
            models = dict(self._models)
        name = self.settings.aliases.get(name.strip().lower(), name)
        try:
            m = resolve_name(name, models)
        except LookupError as e:
            raise InvalidRequest(str(e), param="model") from e
        if m is None:
            raise ModelNotFound(name)
        return m

    def preset(self, name: str) -> PresetConfig | None:
        return self.settings.presets.get(name.strip().lower())

    def target(self, name: str) -> Target:
        """A request's `model`: a preset's own id first, then any model name."""
        p = self.preset(name)
        if p is not None:
            return Target(self.resolve(p.model), p)
        return Target(self.resolve(name))

    def group_of(self, model_id: str) -> tuple[str, set[str]] | None:
        """The group a model belongs to and its members' ids."""
        for gname, g in self.settings.groups.items():
            ids = set()
            for member in g.members:
                try:
                    ids.add(self.resolve(member).id)
                except LmxError:
                    continue
            if model_id in ids:
                return gname, ids
        return None

    def digest(self, info: ModelInfo) -> str:
        """The sha256 of the model's file: known from the store's blob name when it keeps one
        (Hugging Face cache, Ollama), else computed once and cached by path, size and mtime.
        An upstream's model has no file here: the digest of its URL and id stands for it.
        A model that is a directory (MLX) gets one sha256 over its files' names and digests."""
        if info.upstream is not None:
            ref = f"{info.upstream.server.url}#{info.upstream.model}"
            return hashlib.sha256(ref.encode()).hexdigest()
        path = info.path.resolve()
        if not path.is_dir():
            return self._file_digest(path)
        h = hashlib.sha256()
        for f in sorted(p for p in path.iterdir() if p.is_file()):
            h.update(f"{f.name}\0{self._file_digest(f.resolve())}\n".encode())
        return h.hexdigest()

    def _file_digest(self, blob: Path) -> str:
        m = _HEX64.fullmatch(blob.name)
        if m:
            return m.group(1)
        return self._digests.get(blob)


FileStamp = tuple[int, int, int]


def file_stamp(path: Path) -> FileStamp | None:
    """What identifies a file's content cheaply: (inode, size, mtime); None when it is gone."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class DigestCache:
    """sha256 of files, computed once and kept on disk keyed by (path, size, mtime)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._known: dict[str, str] | None = None

    def _load(self) -> dict[str, str]:
        if self._known is None:
            try:
                data = json.loads(self.path.read_text("utf-8"))
                self._known = {str(k): str(v) for k, v in data.items()}
            except (OSError, ValueError, AttributeError):
                self._known = {}
        return self._known

    def get(self, path: Path) -> str:
        try:
            st = path.stat()
        except OSError:
            return hashlib.sha256(str(path).encode()).hexdigest()  # gone: a stable stand-in
        key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
        with self._lock:
            hit = self._load().get(key)
        if hit:
            return hit
        h = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        value = h.hexdigest()
        with self._lock:
            known = self._load()
            known[key] = value
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.path.with_suffix(".tmp")
                tmp.write_text(json.dumps(known), "utf-8")
                tmp.replace(self.path)
            except OSError as e:
                log.warning("cannot save digests to %s: %s", self.path, e)
        return value
