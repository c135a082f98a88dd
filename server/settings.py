"""Settings: one declarative table feeds the config file, the environment and the flags.

Each `Setting` names a key of the TOML file, an `LMX_*` environment variable and (when it has
one) a command-line flag, with its parser, its bounds and what a change needs: `live` settings
apply on reload, `model` settings reload a loaded model when it is next idle, `restart`
settings need a new process. Precedence: defaults < config file < environment < flags.

A `ConfigStore` holds the current `Settings`, an immutable snapshot; a reload builds a new one
from the same sources and swaps it, so a request always sees one consistent view.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import logging
import os
import re
import threading
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

log = logging.getLogger(__name__)

DEFAULT_PORT = 8421
DEFAULT_CONFIG = Path("~/.config/lmx/config.toml")

Kind = Literal["int", "float", "str", "bool", "duration", "size", "paths", "strs", "path", "urls"]
Reload = Literal["live", "model", "restart"]
KV_CACHE_TYPES = ("f16", "q8_0", "q4_0")  # server.memory.KV_TYPE_BYTES has their sizes


class ConfigError(ValueError):
    """The config cannot be used; the message names the source and the fault."""


# ----- value parsers ----------------------------------------------------------------------

_DURATION = re.compile(r"(-?\d+(?:\.\d+)?)(ms|s|m|h)?")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: str | int | float) -> float:
    """Ollama-style keep_alive: '10m', '1h30m', '45s', 300 (seconds), '-1' (forever)."""
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    text = value.strip().lower()
    if not text:
        raise ValueError("empty duration")
    pos, total = 0, 0.0
    while pos < len(text):
        m = _DURATION.match(text, pos)
        if not m or m.end() == pos:
            raise ValueError(f"invalid duration {value!r} (examples: 10m, 1h, 30s, -1)")
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    return total


def parse_memory(value: str | int) -> int:
    from server.memory import parse_size

    if isinstance(value, bool):
        raise ValueError(f"invalid size {value!r}")
    return value if isinstance(value, int) else parse_size(value)


def _parse(kind: Kind, value: Any) -> Any:
    """A value from TOML (typed) or from the environment / a flag (text), as `kind`."""
    text = isinstance(value, str)
    if kind == "int":
        if isinstance(value, bool) or not (isinstance(value, int) or text):
            raise ValueError(f"expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"expected an integer, got {value!r}") from None
    if kind == "float":
        if isinstance(value, bool) or not (isinstance(value, (int, float)) or text):
            raise ValueError(f"expected a number, got {value!r}")
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"expected a number, got {value!r}") from None
    if kind == "str":
        if not text:
            raise ValueError(f"expected a string, got {value!r}")
        return value
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if text and value.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if text and value.strip().lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true or false, got {value!r}")
    if kind == "duration":
        return parse_duration(value)
    if kind == "size":
        return parse_memory(value)
    if kind == "paths":
        items = value.split(os.pathsep) if text else value
        if not isinstance(items, list) or not all(isinstance(p, (str, Path)) for p in items):
            raise ValueError(f"expected a list of folders, got {value!r}")
        return tuple(Path(p).expanduser() for p in items if str(p))
    if kind == "strs":
        items = value.split(",") if text else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(x, str) for x in items):
            raise ValueError(f"expected a list of strings, got {value!r}")
        return tuple(x.strip() for x in items if x.strip())
    if kind == "path":
        if isinstance(value, Path):
            return value
        if not text or not value:
            raise ValueError(f"expected a file path, got {value!r}")
        return Path(value).expanduser()
    if kind == "urls":
        # From the environment: separated by commas or spaces (a URL holds neither).
        items = value.replace(",", " ").split() if text else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(u, str) for u in items):
            raise ValueError(f"expected a list of [NAME=]URL, got {value!r}")
        for u in items:
            split_upstream(u)
        return tuple(u.strip() for u in items if u.strip())
    raise AssertionError(kind)


def upstream_url(url: str) -> str:
    """An upstream's OpenAI base URL: http(s), no trailing slash, `/v1` when only a host is
    given. Raises ValueError saying what is wrong."""
    from urllib.parse import urlsplit

    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"an upstream URL needs http:// or https:// and a host, not {url!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"an upstream URL takes no query or fragment: {url!r}")
    return url if parts.path else url + "/v1"


def split_upstream(spec: str) -> tuple[str, str]:
    """`[NAME=]URL` -> (name, base URL); the name defaults to the URL's host:port."""
    from urllib.parse import urlsplit

    name, sep, url = spec.strip().partition("=")
    if not sep or "://" in name:
        name, url = "", spec.strip()
    url = upstream_url(url)
    name = (name.strip() or urlsplit(url).netloc).lower()
    return name, url


@dataclass(frozen=True)
class Setting:
    """One user setting: file key, environment variable, flag, parser, bounds, reload rule."""

    name: str
    kind: Kind
    help: str
    flag: str | None = None
    reload: Reload = "live"
    low: float | None = None
    high: float | None = None
    per_model: bool = False  # may also be set in [models."<id>"]
    secret: bool = False  # never printed
    choices: tuple[str, ...] = ()  # a "str" setting: the values allowed (any when empty)

    @property
    def env(self) -> str:
        return "LMX_" + self.name.upper()

    def parse(self, value: Any) -> Any:
        """The checked value, or ValueError saying what is wrong."""
        v = _parse(self.kind, value)
        if self.choices and isinstance(v, str):
            v = v.strip().lower()
            if v not in self.choices:
                raise ValueError(f"{self.name} {value!r} is not one of {', '.join(self.choices)}")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if self.low is not None and v < self.low:
                raise ValueError(f"{self.name} {v} is below the minimum {_num(self.low)}")
            if self.high is not None and v > self.high:
                raise ValueError(f"{self.name} {v} is above the maximum {_num(self.high)}")
        return v


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


SETTINGS: tuple[Setting, ...] = (
    Setting("host", "str", "address to listen on (default 127.0.0.1)", "--host", "restart"),
    Setting(
        "port", "int", "port to listen on (default 8421; 0: any)", "--port", "restart", 0, 65535
    ),
    Setting(
        "api_key",
        "str",
        "require this key (Bearer or X-API-Key) on every request but /health",
        "--api-key",
        secret=True,
    ),
    Setting(
        "admin_key",
        "str",
        "a key for everything, /admin, pulls and deletes included (--api-key: inference only)",
        "--admin-key",
        secret=True,
    ),
    Setting(
        "api_key_file",
        "path",
        "a file of named keys, 'name: key [scope=admin] [max_concurrent=N] [max_tokens=N]' "
        "per line, re-read when it changes",
        "--api-key-file",
    ),
    Setting(
        "key_max_concurrent",
        "int",
        "requests one key may run at once, for keys without their own limit (0: no limit)",
        "--key-max-concurrent",
        low=0,
    ),
    Setting(
        "key_max_tokens",
        "int",
        "most tokens one request of a key may generate, for keys without their own (0: no cap)",
        "--key-max-tokens",
        low=0,
    ),
    Setting(
        "metrics_public",
        "bool",
        "serve /metrics without a key (default false: any valid key)",
    ),
    Setting(
        "cors_origins",
        "strs",
        "let a web page from ORIGIN call the API from a browser (repeatable; off by default)",
        "--cors-origin",
        "restart",
    ),
    Setting("tls_cert", "path", "serve HTTPS with this certificate (PEM)", "--tls-cert", "restart"),
    Setting("tls_key", "path", "the private key of --tls-cert (PEM)", "--tls-key", "restart"),
    Setting(
        "model_dirs", "paths", "folder searched recursively for models (repeatable)", "--model-dir"
    ),
    Setting(
        "ctx", "int", "context length per slot (default 4096)", "--ctx", "model", 64, per_model=True
    ),
    Setting(
        "parallel",
        "int",
        "requests decoded together per model (default 4)",
        "--parallel",
        "model",
        1,
        64,
        per_model=True,
    ),
    Setting("threads", "int", "CPU threads per model (0: all cores)", "--threads", "model", 0),
    Setting(
        "gpu_layers",
        "int",
        "layers offloaded to NVIDIA GPUs (-1: as many as fit the free VRAM, the default)",
        "--gpu-layers",
        "model",
        -1,
        per_model=True,
    ),
    Setting(
        "main_gpu",
        "int",
        "put models on this GPU alone (its CUDA index; default: the one with most free VRAM, "
        "else spread over all)",
        "--main-gpu",
        "model",
        0,
        per_model=True,
    ),
    Setting(
        "max_queue",
        "int",
        "requests that may wait per model before 429 (default 64)",
        "--max-queue",
        "model",
        0,
    ),
    Setting(
        "cache_type_k",
        "str",
        "KV cache type for keys: f16 (default), q8_0 (about half the KV memory), q4_0",
        "--cache-type-k",
        "model",
        per_model=True,
        choices=KV_CACHE_TYPES,
    ),
    Setting(
        "cache_type_v",
        "str",
        "KV cache type for values: f16 (default), q8_0, q4_0",
        "--cache-type-v",
        "model",
        per_model=True,
        choices=KV_CACHE_TYPES,
    ),
    Setting(
        "batch_invariant",
        "bool",
        "temperature-0 text identical alone and batched (default true); false: "
        "llama-server's 512-row ubatch, faster long prefills",
        "--batch-invariant",
        "model",
        per_model=True,
    ),
    Setting(
        "prompt_cache_ram",
        "size",
        "RAM for prompt prefixes kept beyond the slots and across model swaps, inside the "
        "memory budget (default: 25%% of it, at most 4G; 0: off)",
        "--prompt-cache-ram",
        low=0,
    ),
    Setting(
        "prompt_cache_disk",
        "size",
        "disk for prompt prefixes spilled from RAM, kept across restarts (default 4G; 0: RAM only)",
        "--prompt-cache-disk",
        "restart",
        low=0,
    ),
    Setting(
        "prompt_cache_dir",
        "path",
        "where spilled prompt prefixes go (default: $XDG_CACHE_HOME/lmx/prompt-cache)",
        "--prompt-cache-dir",
        "restart",
    ),
    Setting(
        "max_memory",
        "size",
        "memory budget for loaded models, e.g. 8G (default: 80%% of free RAM)",
        "--max-memory",
        low=1,
    ),
    Setting(
        "max_loaded_models",
        "int",
        "most models loaded at once (default 0: no limit but memory)",
        "--max-loaded-models",
        low=0,
    ),
    Setting(
        "keep_alive",
        "duration",
        "unload a model this long after its last request: 5m (default), 30s, 1h, 0, -1 (never)",
        "--keep-alive",
        per_model=True,
    ),
    Setting(
        "load_timeout",
        "float",
        "seconds a load waits for busy models to finish before 503 (default 30)",
        "--load-timeout",
        low=0,
    ),
    Setting("hf_cache", "bool", "look for models in the Hugging Face cache (default true)"),
    Setting("user_stores", "bool", "look in Ollama's and LM Studio's stores (default true)"),
    Setting("download_concurrency", "int", "downloads at once (default 2)", low=1, high=16),
    Setting(
        "upstream",
        "urls",
        "serve the models of another OpenAI-compatible server (vLLM, SGLang, llama-server, "
        "Ray Serve, another lmx) at URL (repeatable)",
        "--upstream",
    ),
    Setting(
        "reasoning",
        "bool",
        "split <think> reasoning out of thinking models' replies (default true)",
        per_model=True,
    ),
)
SETTINGS_BY_NAME = {s.name: s for s in SETTINGS}
LISTS = ("paths", "strs", "urls")  # kinds whose values add up across file, environment and flags


class ModelConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Per-model overrides in `[models."<id>"]` (the table's per-model settings, plus these)."""

    ctx: int | None = None
    parallel: int | None = None
    gpu_layers: int | None = None
    main_gpu: int | None = None
    keep_alive: str | int | float | None = None
    cache_type_k: str | None = None
    cache_type_v: str | None = None
    batch_invariant: bool | None = None
    chat_template: str | None = None
    reasoning: bool | None = None
    pin: bool = False


class GroupConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """`[groups.NAME]`: models that may be loaded together (llama-swap's groups)."""

    members: list[str]
    exclusive: bool = True  # loading a member unloads the members of other groups


class PresetConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """`[presets.NAME]`: a model id of its own over a base model (like an Ollama Modelfile)."""

    model: str
    system: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    max_tokens: int | None = None
    stop: list[str] | None = None


class KeyConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """`[keys.NAME]`: the scope and limits of the key named NAME (`api`, `admin` or a name
    in the key file)."""

    scope: Literal["inference", "admin"] | None = None
    max_concurrent: Annotated[int, msgspec.Meta(ge=0)] | None = None
    max_tokens: Annotated[int, msgspec.Meta(ge=0)] | None = None


class UpstreamConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """`[upstreams.NAME]`: another OpenAI-compatible server whose models lmx lists and forwards
    requests to (server/upstreams.py)."""

    url: str  # its OpenAI base URL (http://host:8000/v1; a bare host:port gets /v1)
    api_key: str | None = None  # sent as `Authorization: Bearer`
    models: list[str] | None = None  # its model ids to serve; None: what its /v1/models lists
    prefix: str = ""  # put before its model ids in lmx ("gpu/" -> gpu/<its id>)
    cmd: str | None = None  # a command serving `url`: started on first use, stopped when idle
    keep_alive: str | int | float | None = None  # its models' keep_alive ([models."id"] wins)
    timeout: float = 600.0  # seconds to wait for its next bytes (connecting waits 2 s at most)
    start_timeout: float = 120.0  # cmd: seconds for the started server to answer
    parallel: int = 64  # requests forwarded at once; more wait in lmx's queue (max_queue)

    def __post_init__(self) -> None:
        self.url = upstream_url(self.url)
        if self.cmd is not None and not self.models:
            raise ValueError("an upstream with `cmd` needs its `models` listed")
        if self.keep_alive is not None:
            parse_duration(self.keep_alive)
        if self.timeout <= 0 or self.start_timeout <= 0 or self.parallel < 1:
            raise ValueError("timeout and start_timeout must be positive, parallel at least 1")


class _Sections(msgspec.Struct, kw_only=True):
    models: dict[str, ModelConfig] = {}
    aliases: dict[str, str] = {}
    groups: dict[str, GroupConfig] = {}
    presets: dict[str, PresetConfig] = {}
    keys: dict[str, KeyConfig] = {}
    upstreams: dict[str, UpstreamConfig] = {}


@dataclass(frozen=True)
class Settings:
    """One immutable snapshot of every setting. Change it with `dataclasses.replace`."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    api_key: str | None = field(default=None, repr=False)
    admin_key: str | None = field(default=None, repr=False)
    api_key_file: Path | None = None
    key_max_concurrent: int = 0
    key_max_tokens: int = 0
    metrics_public: bool = False
    cors_origins: tuple[str, ...] = ()
    tls_cert: Path | None = None
    tls_key: Path | None = None
    model_dirs: tuple[Path, ...] = ()
    ctx: int = 4096
    parallel: int = 4
    threads: int = 0
    gpu_layers: int = -1
    main_gpu: int | None = None  # None: lmx chooses
    max_queue: int = 64
    cache_type_k: str = "f16"  # KV cache types: f16, q8_0, q4_0
    cache_type_v: str = "f16"
    batch_invariant: bool = True  # temperature-0 text independent of batch neighbours
    prompt_cache_ram: int | None = None  # bytes; None: a share of the budget (memory.py)
    prompt_cache_disk: int = 4 * 2**30  # bytes of spilled prompt prefixes; 0: RAM only
    prompt_cache_dir: Path | None = None  # default: $XDG_CACHE_HOME/lmx/prompt-cache
    max_memory: int | None = None  # bytes; None: a safe share of the RAM available at start
    max_loaded_models: int = 0  # 0: no limit but memory
    keep_alive: float = 300.0  # seconds after the last request; negative: forever
    load_timeout: float = 30.0
    hf_cache: bool = True
    user_stores: bool = True
    download_concurrency: int = 2
    upstream: tuple[str, ...] = ()  # --upstream [NAME=]URL, as given
    reasoning: bool = True  # split thinking out of chat replies
    models: Mapping[str, ModelConfig] = field(default_factory=dict)
    aliases: Mapping[str, str] = field(default_factory=dict)
    groups: Mapping[str, GroupConfig] = field(default_factory=dict)
    presets: Mapping[str, PresetConfig] = field(default_factory=dict)
    keys: Mapping[str, KeyConfig] = field(default_factory=dict)
    upstreams: Mapping[str, UpstreamConfig] = field(default_factory=dict)
    config_path: Path | None = None
    # Not user settings: where to look, for tests and embedding (never from file/env/flags).
    include_default_model: bool = True
    hf_cache_dir: Path | None = None
    ollama_dir: Path | None = None  # default: $OLLAMA_MODELS or ~/.ollama/models
    lmstudio_dirs: tuple[Path, ...] | None = None  # default: ~/.lmstudio/models, ...

    def model_config(self, model_id: str) -> ModelConfig | None:
        return self.models.get(model_id)

    def for_model(self, name: str, model_id: str) -> Any:
        """A per-model setting: the model's own value when it sets one, else the global."""
        mc = self.models.get(model_id)
        v = getattr(mc, name, None) if mc is not None else None
        if v is None:
            return getattr(self, name)
        setting = SETTINGS_BY_NAME.get(name)
        return setting.parse(v) if setting is not None else v  # "10m" -> 600.0, "Q8_0" -> q8_0

    def upstream_configs(self) -> dict[str, UpstreamConfig]:
        """Every upstream by name: the `[upstreams.NAME]` sections, then each `--upstream`
        (one naming a section replaces only its url)."""
        out = dict(self.upstreams)
        for spec in self.upstream:
            name, url = split_upstream(spec)
            base = out.get(name)
            out[name] = msgspec.structs.replace(base, url=url) if base else UpstreamConfig(url=url)
        return out

    def bind_refusal(self) -> str | None:
        """Why binding `host` is refused, or None when it is allowed."""
        if self.tls_cert is None and self.tls_key is not None:
            return "--tls-key needs --tls-cert (the certificate it belongs to)"
        if self.tls_cert is not None and self.tls_key is None:
            return "--tls-cert needs --tls-key (the certificate's private key)"
        if self.api_key or self.admin_key or self.api_key_file or is_loopback(self.host):
            return None
        return (
            f"refusing to listen on {self.host} without an API key: anyone who can reach this "
            "machine could use its models. Pass --api-key KEY (or set LMX_API_KEY), "
            "--admin-key KEY or --api-key-file FILE, or use --host 127.0.0.1."
        )


def _field_names() -> set[str]:
    return {f.name for f in dataclasses.fields(Settings)}


def build_settings(
    *,
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Settings:
    """Defaults, overlaid by the file at `path`, the `LMX_*` environment, then `flags` (already
    typed values, or text to parse). Raises ConfigError naming the source and the fault."""
    values: dict[str, Any] = {}
    sections = _Sections()
    if path is not None:
        values, sections = _read_file(path)
    env = os.environ if env is None else env
    for s in SETTINGS:
        raw = env.get(s.env)
        if raw is None or raw == "":
            continue
        try:
            v = s.parse(raw)
        except ValueError as e:
            raise ConfigError(f"environment {s.env}: {e}") from e
        values[s.name] = values.get(s.name, ()) + v if s.kind in LISTS else v
    _host_env(env, values)
    known = _field_names()
    for name, raw in (flags or {}).items():
        if raw is None:
            continue
        setting = SETTINGS_BY_NAME.get(name)
        if setting is None:
            if name not in known:
                raise ConfigError(f"unknown setting {name!r}")
            values[name] = raw  # an internal field (tests, embedding)
            continue
        try:
            v = setting.parse(raw)
        except ValueError as e:
            raise ConfigError(f"{setting.flag or setting.name}: {e}") from e
        values[name] = values.get(name, ()) + v if setting.kind in LISTS else v
    out = Settings(
        **values,
        models={k.lower(): v for k, v in sections.models.items()},
        aliases={k.lower(): v for k, v in sections.aliases.items()},
        groups=dict(sections.groups),
        presets={k.lower(): v for k, v in sections.presets.items()},
        keys=dict(sections.keys),
        upstreams={k.lower(): v for k, v in sections.upstreams.items()},
        config_path=path,
    )
    return out


def _host_env(env: Mapping[str, str], values: dict[str, Any]) -> None:
    """LMX_HOST is `host`, `host:port` or a URL, as OLLAMA_HOST is (the CLI uses it too)."""
    raw = (env.get("LMX_HOST") or "").strip()
    if not raw:
        return
    host, port = split_host(raw)
    values["host"] = host
    if port is not None:
        values["port"] = port


def split_host(text: str) -> tuple[str, int | None]:
    """`http://h:1`, `h:1`, `[::1]:1`, `h` -> (host, port or None)."""
    text = re.sub(r"^[a-z]+://", "", text.strip()).rstrip("/")
    m = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?", text)
    if m:
        return m.group(1), int(m.group(2)) if m.group(2) else None
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        if not port.isdigit():
            raise ConfigError(f"LMX_HOST: cannot read the port of {text!r}")
        return host or "127.0.0.1", int(port)
    return text, None


def _read_file(path: Path) -> tuple[dict[str, Any], _Sections]:
    """The file's top-level settings (parsed) and its sections; ConfigError with the line."""
    try:
        raw = path.expanduser().read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror or e}") from e
    try:
        text = raw.decode("utf-8")
        data = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"invalid config {path}: {e}") from e
    values: dict[str, Any] = {}
    section_keys = {f for f in _Sections.__struct_fields__}
    for key, value in data.items():
        if key in section_keys:
            continue
        s = SETTINGS_BY_NAME.get(key)
        if s is None:
            raise ConfigError(f"invalid config {path}: unknown setting {key!r}{_line(text, key)}")
        try:
            values[key] = s.parse(value)
        except ValueError as e:
            raise ConfigError(f"invalid config {path}: {key}: {e}{_line(text, key)}") from e
    try:
        sections = msgspec.convert({k: data[k] for k in section_keys if k in data}, _Sections)
    except msgspec.ValidationError as e:
        raise ConfigError(f"invalid config {path}: {e}{_line_of(text, str(e))}") from e
    for mid, mc in sections.models.items():
        for s in SETTINGS:
            v = getattr(mc, s.name, None) if s.per_model else None
            if v is None:
                continue
            try:
                s.parse(v)
            except ValueError as e:
                where = _line(text, s.name)
                raise ConfigError(f'invalid config {path}: [models."{mid}"] {e}{where}') from e
    return values, sections


def _line(text: str, key: str) -> str:
    for n, line in enumerate(text.splitlines(), 1):
        if re.match(rf"\s*\"?{re.escape(key)}\"?\s*=", line):
            return f" (line {n})"
    return ""


def _line_of(text: str, message: str) -> str:
    """The line a validation error points at (`... - at `$.models.x.ctx``), when findable."""
    m = re.search(r"`\$\.([^`]+)`", message) or re.search(r"field `([^`]+)`", message)
    if not m:
        return ""
    return _line(text, m.group(1).split(".")[-1].split("[")[0])


def read_config(path: Path) -> Settings:
    """Check a config file on its own (no environment, no flags)."""
    return build_settings(path=path, env={})


Listener = Callable[[Settings, Settings], None]


class ConfigStore:
    """The current settings snapshot and how to rebuild it: file, environment, flags.

    `reload()` re-reads the file; a bad file raises ConfigError and the old snapshot stays.
    Settings that need a restart keep their running value (and a warning says so).
    """

    def __init__(
        self,
        *,
        path: Path | None = None,
        flags: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.path = path
        self._flags = dict(flags or {})
        self._env = dict(os.environ if env is None else env)
        self._lock = threading.Lock()
        self._listeners: list[Listener] = []
        self._current = build_settings(path=path, env=self._env, flags=self._flags)

    @classmethod
    def fixed(cls, settings: Settings) -> ConfigStore:
        """A store around a ready snapshot (tests, embedding); reload re-reads its file."""
        store = cls.__new__(cls)
        store.path = settings.config_path
        store._flags = {
            f.name: getattr(settings, f.name)
            for f in dataclasses.fields(Settings)
            if f.name
            not in ("models", "aliases", "groups", "presets", "keys", "upstreams", "config_path")
            and getattr(settings, f.name) != f.default
        }
        store._env = {}
        store._lock = threading.Lock()
        store._listeners = []
        store._current = settings
        return store

    @property
    def current(self) -> Settings:
        return self._current

    def reload(self) -> tuple[Settings, set[str]]:
        """Rebuild from the sources and swap; returns the new snapshot and the changed names."""
        new = build_settings(path=self.path, env=self._env, flags=self._flags)
        with self._lock:
            old = self._current
            pinned = {
                s.name: getattr(old, s.name)
                for s in SETTINGS
                if s.reload == "restart" and getattr(old, s.name) != getattr(new, s.name)
            }
            for name in pinned:
                log.warning("%s changed in the config; restart lmx to apply it", name)
            new = dataclasses.replace(new, **pinned)
            changed = {
                f.name
                for f in dataclasses.fields(Settings)
                if getattr(old, f.name) != getattr(new, f.name)
            }
            self._current = new
            listeners = list(self._listeners)
        for fn in listeners:
            with contextlib.suppress(Exception):
                fn(old, new)
        return new, changed

    def update(self, **changes: Any) -> Settings:
        """Change settings at run time (kept across reloads, as flags are)."""
        with self._lock:
            self._flags.update(changes)
            old = self._current
            self._current = dataclasses.replace(old, **changes)
            new = self._current
            listeners = list(self._listeners)
        for fn in listeners:
            with contextlib.suppress(Exception):
                fn(old, new)
        return new

    def subscribe(self, fn: Listener) -> Callable[[], None]:
        with self._lock:
            self._listeners.append(fn)

        def unsubscribe() -> None:
            with self._lock, contextlib.suppress(ValueError):
                self._listeners.remove(fn)

        return unsubscribe


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def hf_cache_dir(settings: Settings) -> Path:
    """Where huggingface_hub keeps models (read at call time, so HF_HOME changes apply)."""
    if settings.hf_cache_dir is not None:
        return settings.hf_cache_dir
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or str(Path.home() / ".cache" / "huggingface")
    return Path(home) / "hub"


def state_dir() -> Path:
    """lmx's own state (the download queue): $XDG_STATE_HOME/lmx or ~/.local/state/lmx."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "lmx"


def prompt_cache_dir(settings: Settings) -> Path:
    """Where spilled prompt prefixes go: $XDG_CACHE_HOME/lmx/prompt-cache or ~/.cache/lmx/..."""
    if settings.prompt_cache_dir is not None:
        return settings.prompt_cache_dir
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lmx" / "prompt-cache"


def default_config_path() -> Path | None:
    env = os.environ.get("LMX_CONFIG")
    if env:
        return Path(env)
    p = DEFAULT_CONFIG.expanduser()
    return p if p.is_file() else None
