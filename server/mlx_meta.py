"""Describes an MLX model directory (the mlx-community layout) without loading it.

A directory is an MLX model when it holds `config.json`, weights in `model*.safetensors` (the
files mlx-lm loads) and a tokenizer (`tokenizer.json`, `tokenizer.model` or `vocab.json`).
Everything here comes from config.json, tokenizer_config.json and the safetensors headers;
no weight is read and nothing imports MLX.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.safetensors import SafetensorsError, SafetensorsHeader, read_safetensors

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
# Quantized layers store packed uint32 words plus `scales` (and `biases` in affine mode).
_QUANT_PARTS = (".scales", ".biases")


class MlxMetaError(ValueError):
    """The directory cannot be used as an MLX model; the message says why."""


@dataclass
class MlxMeta:
    """What config.json, the tokenizer config and the safetensors headers say about a model."""

    path: Path
    config: dict[str, Any]
    headers: list[SafetensorsHeader] = field(default_factory=list)
    chat_template: str | None = None

    def value(self, key: str, default: Any = None) -> Any:
        """A config value, looked up in `text_config` too (multimodal configs nest it)."""
        if key in self.config:
            return self.config[key]
        text = self.config.get("text_config")
        if isinstance(text, dict) and key in text:
            return text[key]
        return default

    @property
    def architecture(self) -> str | None:
        mt = self.config.get("model_type")
        return str(mt) if mt else None

    @property
    def context_length(self) -> int | None:
        v = self.value("max_position_embeddings")
        return int(v) if isinstance(v, int) and v > 0 else None

    @property
    def quant_config(self) -> dict[str, Any] | None:
        q = self.config.get("quantization") or self.config.get("quantization_config")
        return q if isinstance(q, dict) else None

    @property
    def quantization(self) -> str:
        """`4bit`, `8bit`, `mxfp4` (mlx-community's names), or the weights' float dtype."""
        q = self.quant_config
        if q is not None:
            mode = str(q.get("mode", "affine"))
            if "bits" in q and mode == "affine":
                return f"{int(q['bits'])}bit"
            return mode if mode != "affine" else str(q.get("quant_method", "quantized"))
        dtypes: Counter[str] = Counter()
        for h in self.headers:
            for t in h.tensors.values():
                dtypes[t.dtype] += t.n_bytes
        return dtypes.most_common(1)[0][0].lower() if dtypes else "unknown"

    @property
    def group_size(self) -> int | None:
        q = self.quant_config
        return int(q["group_size"]) if q and "group_size" in q else None

    @property
    def weights_bytes(self) -> int:
        return sum(h.data_bytes for h in self.headers)

    @property
    def parameter_count(self) -> int:
        """Weights as the model sees them: a packed word counts for the values it holds."""
        tensors = {n: t for h in self.headers for n, t in h.tensors.items()}
        total = 0
        for name, t in tensors.items():
            if name.endswith(_QUANT_PARTS) and name.rsplit(".", 1)[0] + ".weight" in tensors:
                continue
            base = name.rsplit(".", 1)[0]
            scales = tensors.get(base + ".scales")
            if name.endswith(".weight") and scales is not None and t.dtype == "U32":
                group = self._group_for(base)
                # in_dims = scale groups x group size; each row packs in_dims values
                total += t.n_elements // t.shape[-1] * scales.shape[-1] * group
            else:
                total += t.n_elements
        return total

    def _group_for(self, module: str) -> int:
        q = self.quant_config or {}
        per = q.get(module)
        if isinstance(per, dict) and "group_size" in per:
            return int(per["group_size"])
        return int(q.get("group_size", 64))

    @property
    def float_bytes(self) -> int:
        """Bytes of the dtype activations (and so the KV cache) run in."""
        for key in ("torch_dtype", "dtype"):
            v = self.value(key)
            if isinstance(v, str):
                return 4 if "32" in v else 2
        floats: Counter[str] = Counter()
        for h in self.headers:
            for t in h.tensors.values():
                if t.dtype in ("F32", "F16", "BF16"):
                    floats[t.dtype] += 1
        top = floats.most_common(1)
        return 4 if top and top[0][0] == "F32" else 2

    @property
    def layers(self) -> int:
        return int(self.value("num_hidden_layers", 0) or 0)

    @property
    def hidden_size(self) -> int:
        return int(self.value("hidden_size", 0) or 0)

    @property
    def kv_heads(self) -> int:
        return int(self.value("num_key_value_heads") or self.value("num_attention_heads") or 0)

    @property
    def head_dim(self) -> int:
        v = self.value("head_dim")
        if isinstance(v, int) and v > 0:
            return v
        heads = int(self.value("num_attention_heads", 0) or 0)
        return self.hidden_size // heads if heads else 0

    @property
    def vocab_size(self) -> int:
        return int(self.value("vocab_size", 0) or 0)

    @property
    def tokenizer_bytes(self) -> int:
        """Size of the tokenizer's files (its Python objects take a multiple of it)."""
        total = 0
        for name in (*TOKENIZER_FILES, "merges.txt"):
            f = self.path / name
            if f.is_file():
                total += f.stat().st_size
        return total

    @property
    def intermediate_size(self) -> int:
        return int(self.value("intermediate_size", 0) or 0)


def looks_like_mlx_dir(folder: Path) -> bool:
    """A folder worth describing: config.json next to safetensors weights, or next to a
    tokenizer with no GGUF beside it (a model whose weights are missing)."""
    if not (folder / "config.json").is_file():
        return False
    if any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").exists():
        return True
    has_tokenizer = any((folder / n).is_file() for n in TOKENIZER_FILES)
    return has_tokenizer and not any(folder.glob("*.gguf"))


def weight_files(folder: Path) -> list[Path]:
    """The files mlx-lm loads weights from."""
    return sorted(folder.glob("model*.safetensors"))


def read_mlx_meta(folder: Path) -> MlxMeta:
    """Describe an MLX model directory. Raises MlxMetaError with a one-line reason."""
    try:
        config = json.loads((folder / "config.json").read_text("utf-8"))
    except OSError as e:
        raise MlxMetaError(f"config.json unreadable: {e.strerror or e}") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MlxMetaError(f"config.json is not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise MlxMetaError("config.json is not a JSON object")
    if not config.get("model_type"):
        raise MlxMetaError("config.json names no model_type")
    files = weight_files(folder)
    if not files:
        raise MlxMetaError("no model*.safetensors weights")
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            wanted = set(json.loads(index.read_text("utf-8")).get("weight_map", {}).values())
        except (OSError, ValueError, AttributeError) as e:
            raise MlxMetaError(f"model.safetensors.index.json unreadable ({e})") from e
        missing = sorted(w for w in wanted if not (folder / w).exists())
        if missing:
            raise MlxMetaError(f"weight shard missing: {missing[0]} (partial download?)")
    if not any((folder / n).is_file() for n in TOKENIZER_FILES):
        raise MlxMetaError("no tokenizer (tokenizer.json, tokenizer.model or vocab.json)")
    headers = []
    for f in files:
        try:
            headers.append(read_safetensors(f))
        except SafetensorsError as e:
            raise MlxMetaError(str(e)) from e
    return MlxMeta(folder, config, headers, _chat_template(folder))


def _chat_template(folder: Path) -> str | None:
    """The template the tokenizer would use: chat_template.jinja, then tokenizer_config.json."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        try:
            return jinja.read_text("utf-8")
        except (OSError, UnicodeDecodeError):
            return None
    for name in ("tokenizer_config.json", "chat_template.json"):
        try:
            data = json.loads((folder / name).read_text("utf-8"))
        except (OSError, ValueError):
            continue
        t = data.get("chat_template") if isinstance(data, dict) else None
        if isinstance(t, str):
            return t
        if isinstance(t, list):  # named templates: the default one
            named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
            default = named.get("default") or next(iter(named.values()), None)
            return default if isinstance(default, str) else None
    return None
