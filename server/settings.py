"""Settings: defaults, overlaid by the TOML config file, overlaid by command-line flags."""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

DEFAULT_PORT = 8421
DEFAULT_CONFIG = Path("~/.config/lmx/config.toml")


class ConfigError(ValueError):
    """The config file cannot be used; the message names the file and the fault."""


class ModelConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Per-model overrides in `[models."<id>"]`."""

    ctx: int | None = None
    parallel: int | None = None
    gpu_layers: int | None = None
    chat_template: str | None = None
    keep_alive: str | int | float | None = None
    pin: bool = False
    cache_type_k: str | None = None
    cache_type_v: str | None = None
    batch_invariant: bool | None = None


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


class ConfigFile(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The TOML file's shape."""

    host: str | None = None
    port: int | None = None
    api_key: str | None = None
    model_dirs: list[str] = []
    ctx: int | None = None
    parallel: int | None = None
    threads: int | None = None
    gpu_layers: int | None = None
    max_queue: int | None = None
    max_memory: str | int | None = None
    max_loaded_models: int | None = None
    keep_alive: str | int | float | None = None
    load_timeout: float | None = None
    hf_cache: bool = True
    user_stores: bool = True
    cache_type_k: str | None = None
    cache_type_v: str | None = None
    batch_invariant: bool | None = None
    prompt_cache_ram: str | int | None = None
    prompt_cache_disk: str | int | None = None
    prompt_cache_dir: str | None = None
    models: dict[str, ModelConfig] = {}
    aliases: dict[str, str] = {}
    groups: dict[str, GroupConfig] = {}
    presets: dict[str, PresetConfig] = {}


@dataclass
class Settings:
    """Everything the server and the TUI need to know at start."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    api_key: str | None = None
    model_dirs: list[Path] = field(default_factory=list)
    ctx: int = 4096
    parallel: int = 4
    threads: int = 0
    gpu_layers: int = -1
    max_queue: int = 64
    max_memory: int | None = None  # bytes; None: a safe share of the RAM available at start
    max_loaded_models: int = 0  # 0: no limit but memory
    keep_alive: float = 300.0  # seconds after the last request; negative: forever
    load_timeout: float = 30.0  # how long a load waits for busy models to finish
    include_default_model: bool = True
    include_hf_cache: bool = True
    hf_cache_dir: Path | None = None
    include_user_stores: bool = True  # Ollama's and LM Studio's models
    ollama_dir: Path | None = None  # default: $OLLAMA_MODELS or ~/.ollama/models
    lmstudio_dirs: list[Path] | None = None  # default: ~/.lmstudio/models, ~/.cache/lm-studio
    download_concurrency: int = 2
    cache_type_k: str = "f16"  # KV cache types: f16, q8_0, q4_0
    cache_type_v: str = "f16"
    batch_invariant: bool = True  # temperature-0 text independent of batch neighbours
    prompt_cache_ram: int | None = None  # bytes; None: a share of the budget (memory.py)
    prompt_cache_disk: int = 4 * 2**30  # bytes of spilled prompt prefixes; 0: RAM only
    prompt_cache_dir: Path | None = None  # default: $XDG_CACHE_HOME/lmx/prompt-cache
    models: dict[str, ModelConfig] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    groups: dict[str, GroupConfig] = field(default_factory=dict)
    presets: dict[str, PresetConfig] = field(default_factory=dict)
    config_path: Path | None = None

    def apply_file(self, path: Path) -> None:
        """Overlay a TOML config file. Raises ConfigError with the file and the line at fault."""
        cf = read_config(path)
        for name in (
            "host",
            "port",
            "api_key",
            "ctx",
            "parallel",
            "threads",
            "gpu_layers",
            "max_queue",
            "cache_type_k",
            "cache_type_v",
            "batch_invariant",
        ):
            v = getattr(cf, name)
            if v is not None:
                setattr(self, name, v)
        try:
            if cf.prompt_cache_ram is not None:
                self.prompt_cache_ram = parse_memory(cf.prompt_cache_ram)
            if cf.prompt_cache_disk is not None:
                self.prompt_cache_disk = parse_memory(cf.prompt_cache_disk)
        except ValueError as e:
            raise ConfigError(f"invalid config {path}: {e}") from e
        if cf.prompt_cache_dir is not None:
            self.prompt_cache_dir = Path(cf.prompt_cache_dir).expanduser()
        self.model_dirs += [Path(d).expanduser() for d in cf.model_dirs]
        self.include_hf_cache = cf.hf_cache
        self.include_user_stores = cf.user_stores
        self.apply_model_sections(cf)
        self.config_path = path
        self.validate()

    def apply_model_sections(self, cf: ConfigFile) -> None:
        """The parts a running server takes on reload: per-model settings, aliases, groups,
        presets."""
        self.models = {k.lower(): v for k, v in cf.models.items()}
        self.aliases = {k.lower(): v for k, v in cf.aliases.items()}
        self.groups = dict(cf.groups)
        self.presets = {k.lower(): v for k, v in cf.presets.items()}
        if cf.keep_alive is not None:
            self.keep_alive = parse_duration(cf.keep_alive)

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port {self.port} is out of range 0-65535")
        if self.ctx < 64:
            raise ConfigError(f"ctx {self.ctx} is too small (minimum 64)")
        if not 1 <= self.parallel <= 64:
            raise ConfigError(f"parallel {self.parallel} is out of range 1-64")
        if self.max_queue < 0:
            raise ConfigError("max_queue cannot be negative")
        if self.max_loaded_models < 0:
            raise ConfigError("max_loaded_models cannot be negative")
        if self.max_memory is not None and self.max_memory <= 0:
            raise ConfigError("max_memory must be positive")
        from server.memory import kv_type_bytes

        kinds = [("", self.cache_type_k), ("", self.cache_type_v)]
        for mid, mc in self.models.items():
            kinds += [(f"models.{mid}: ", k) for k in (mc.cache_type_k, mc.cache_type_v) if k]
        for where, kind in kinds:
            try:
                kv_type_bytes(kind)
            except ValueError as e:
                raise ConfigError(f"{where}{e}") from e
        if (self.prompt_cache_ram or 0) < 0 or self.prompt_cache_disk < 0:
            raise ConfigError("prompt cache sizes cannot be negative")

    def bind_refusal(self) -> str | None:
        """Why binding `host` is refused, or None when it is allowed."""
        if self.api_key or is_loopback(self.host):
            return None
        return (
            f"refusing to listen on {self.host} without an API key: anyone who can reach this "
            "machine could use its models. Pass --api-key KEY (or set LMX_API_KEY), "
            "or use --host 127.0.0.1."
        )


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

    return value if isinstance(value, int) else parse_size(value)


def read_config(path: Path) -> ConfigFile:
    """Parse and check a config file; ConfigError names the file and the line at fault."""
    try:
        raw = path.expanduser().read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror or e}") from e
    try:
        text = raw.decode("utf-8")
        data = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"invalid config {path}: {e}") from e
    try:
        cf = msgspec.convert(data, ConfigFile)
        for v in [cf.keep_alive] + [m.keep_alive for m in cf.models.values()]:
            if v is not None:
                parse_duration(v)
    except (msgspec.ValidationError, ValueError) as e:
        raise ConfigError(f"invalid config {path}: {e}{_line_of(text, str(e))}") from e
    return cf


def _line_of(text: str, message: str) -> str:
    """The line a validation error points at (`... - at `$.models.x.ctx``), when findable."""
    m = re.search(r"`\$\.([^`]+)`", message)
    if not m:
        m = re.search(r"field `([^`]+)`", message)
        if not m:
            return ""
    key = m.group(1).split(".")[-1].split("[")[0]
    for n, line in enumerate(text.splitlines(), 1):
        if re.match(rf"\s*\"?{re.escape(key)}\"?\s*=", line):
            return f" (line {n})"
    return ""


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
