"""The catalog: every available model (found without loading weights), ids, aliases, presets,
groups, and content digests. It knows nothing of what is loaded (that is the scheduler)."""

from __future__ import annotations

import hashlib
import json
import logging
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
        self._files: list[ModelInfo] | None = None  # the last file scan
        self._digests = DigestCache(state_dir() / "digests.json")
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
        with self._lock:
            self._models = models
        return list(models.values())

    def models(self) -> list[ModelInfo]:
        with self._lock:
            return list(self._models.values())

    def get(self, model_id: str) -> ModelInfo | None:
        with self._lock:
            return self._models.get(model_id)

    def resolve(self, name: str) -> ModelInfo:
        """The model a user-supplied name (id, alias, unique prefix, `name:tag`) refers to."""
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
        An upstream's model has no file here: the digest of its URL and id stands for it."""
        if info.upstream is not None:
            ref = f"{info.upstream.server.url}#{info.upstream.model}"
            return hashlib.sha256(ref.encode()).hexdigest()
        blob = info.path.resolve()
        m = _HEX64.fullmatch(blob.name)
        if m:
            return m.group(1)
        return self._digests.get(blob)


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
