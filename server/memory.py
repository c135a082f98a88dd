"""Memory before loading: an estimate from the GGUF header (or an MLX directory's config and
safetensors headers), and the budget it must fit."""

from __future__ import annotations

import ctypes
import ctypes.util
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psutil

from server.gguf import GGUFHeader

if TYPE_CHECKING:
    from server.discovery import ModelInfo
    from server.mlx_meta import MlxMeta
    from server.offload import Placement

# Bytes per stored K or V value, by cache type: f16, and ggml's blocks of 32 values (an f16 scale
# plus 32 bytes for q8_0, 16 for q4_0).
KV_TYPE_BYTES = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
KV_BYTES_PER_VALUE = KV_TYPE_BYTES["f16"]  # llama.cpp's default
# The host-RAM prompt cache's default size: this share of the budget, at most PROMPT_CACHE_MAX.
PROMPT_CACHE_SHARE = 0.25
PROMPT_CACHE_MAX = 4 * 2**30
UBATCH = 63  # the engine's ubatch (see server.engines.llamacpp.BATCH_INVARIANT_UBATCH)
UBATCH_FAST = 512  # its ubatch with batch_invariant off (llama-server's)
# llama.cpp's scratch for one ubatch, measured here on SmolLM2-135M and Gemma-3-270M: logits
# for one row per slot (the engine caps outputs at that), plus activations of about
# 4 bytes x ubatch x 12 x embedding width (14.5 MiB and 19.8 MiB at a 512-row ubatch).
COMPUTE_EMBD_FACTOR = 12
# llama.cpp's own tables for the vocabulary (token texts, scores, lookup maps): measured about
# 200 bytes a token (SmolLM2's 49k tokens, Gemma-3's 262k), counted with the compute buffers.
VOCAB_TABLE_BYTES = 200
# mlx-lm grows each KV cache in steps of this many tokens.
MLX_KV_STEP = 256
# mlx-lm's prefill chunk (EngineOptions.n_batch): its activations are part of MLX's compute.
MLX_PREFILL_STEP = 512
# A loaded Hugging Face tokenizer takes about this many times its files' size (measured: 40 MB
# for SmolLM2's 3.5 MB tokenizer.json, with the engine's own token table).
MLX_TOKENIZER_FACTOR = 12
DEFAULT_BUDGET_SHARE = 0.8  # of the RAM available when lmx starts

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "t": 10**12,
    "ki": 2**10,
    "mi": 2**20,
    "gi": 2**30,
    "ti": 2**40,
}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a model will take once loaded with `ctx` tokens per slot and `parallel` slots."""

    weights: int
    kv_cache: int
    compute: int
    ctx: int
    parallel: int
    # How it splits between RAM and GPUs (server/offload.py); None: all in RAM.
    placement: Placement | None = None

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute

    def by_device(self) -> dict[str, int]:
        """Bytes per device: "ram", and "gpu0", "gpu1"... for the GPUs that hold layers."""
        if self.placement is not None:
            return self.placement.devices(self.total)
        return {"ram": self.total}

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "weights": self.weights,
            "kv_cache": self.kv_cache,
            "compute": self.compute,
            "total": self.total,
            "ctx": self.ctx,
            "parallel": self.parallel,
        }
        out["devices"] = self.by_device()
        if self.placement is not None:
            out["offload"] = self.placement.as_dict()
        return out


def estimate(
    header: GGUFHeader,
    ctx: int,
    parallel: int,
    cache_type_k: str = "f16",
    cache_type_v: str = "f16",
    batch_invariant: bool = True,
) -> MemoryEstimate:
    """Weights (by tensor type, as stored), KV cache (at its cache types) and compute buffers."""
    n_train = header.context_length or ctx
    ctx = max(64, min(ctx, n_train))
    layers = int(header.arch_value("block_count", 0) or 0)
    n_embd = int(header.arch_value("embedding_length", 0) or 0)
    n_head = int(header.arch_value("attention.head_count", 1) or 1)
    n_head_kv = header.arch_value("attention.head_count_kv", n_head)
    if isinstance(n_head_kv, list):  # per-layer counts (some hybrid models)
        n_head_kv = max(n_head_kv) if n_head_kv else n_head
    head = n_embd // n_head if n_head else 0
    k_len = int(header.arch_value("attention.key_length", head) or head)
    v_len = int(header.arch_value("attention.value_length", head) or head)
    per_cell = int(n_head_kv) * (
        k_len * kv_type_bytes(cache_type_k) + v_len * kv_type_bytes(cache_type_v)
    )
    kv = int(layers * ctx * parallel * per_cell)
    vocab = header.vocab_size or int(header.arch_value("vocab_size", 0) or 0)
    ubatch = UBATCH if batch_invariant else UBATCH_FAST
    compute = 4 * (parallel * vocab + ubatch * COMPUTE_EMBD_FACTOR * n_embd)
    compute += VOCAB_TABLE_BYTES * vocab
    weights = sum(t.n_bytes or 0 for t in header.tensors) or header.weights_bytes
    return MemoryEstimate(weights, kv, compute, ctx, parallel)


def kv_type_bytes(cache_type: str) -> float:
    """Bytes per K or V value at a cache type (f16, q8_0, q4_0); ValueError names the choices."""
    try:
        return KV_TYPE_BYTES[cache_type.lower()]
    except KeyError:
        raise ValueError(
            f"unknown KV cache type {cache_type!r} (choose from {', '.join(KV_TYPE_BYTES)})"
        ) from None


def prompt_cache_ram(budget: int, setting: int | None) -> int:
    """The prompt cache's RAM limit: the setting, or by default a share of the budget. It only
    ever uses what loaded models leave free (the scheduler lowers its cap as they load)."""
    if setting is not None:
        return max(0, min(setting, budget))
    return int(min(budget * PROMPT_CACHE_SHARE, PROMPT_CACHE_MAX))


def estimate_mlx(meta: MlxMeta, ctx: int, parallel: int) -> MemoryEstimate:
    """Weights as stored in the safetensors files (MLX keeps quantized weights packed), a KV
    cache of layers x KV heads x head dim x 2 (K and V) x ctx x slots in the activation dtype
    (mlx-lm allocates it as the context fills, in 256-token steps), and as compute one prefill
    chunk's activations, each slot's logits and the tokenizer's objects."""
    n_train = meta.context_length or ctx
    ctx = max(64, min(ctx, n_train))
    kv_ctx = -(-ctx // MLX_KV_STEP) * MLX_KV_STEP
    fb = meta.float_bytes
    kv = meta.layers * parallel * kv_ctx * meta.kv_heads * meta.head_dim * 2 * fb
    step = min(MLX_PREFILL_STEP, ctx)
    heads = int(meta.value("num_attention_heads", 0) or 0)
    width = 4 * meta.hidden_size + 3 * meta.intermediate_size
    compute = fb * step * (width + heads * ctx) + 4 * parallel * meta.vocab_size
    compute += MLX_TOKENIZER_FACTOR * meta.tokenizer_bytes
    return MemoryEstimate(meta.weights_bytes, kv, compute, ctx, parallel)


def estimate_by_format(
    info: ModelInfo,
    ctx: int,
    parallel: int,
    cache_type_k: str = "f16",
    cache_type_v: str = "f16",
    batch_invariant: bool = True,
) -> MemoryEstimate:
    """The estimate for any usable model, by its format (the KV cache types and the ubatch
    apply to GGUF models). Raises ValueError for one without the metadata an estimate needs
    (an unusable entry)."""
    if info.mlx is not None:
        return estimate_mlx(info.mlx, ctx, parallel)
    if info.header is not None:
        return estimate(info.header, ctx, parallel, cache_type_k, cache_type_v, batch_invariant)
    raise ValueError(f"no metadata to estimate '{info.id}' from: {info.error}")


def parse_size(text: str) -> int:
    """'8G', '512MiB', '1.5g', '1000000' -> bytes. Raises ValueError with the reason."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"cannot read {text!r} as a size (examples: 8G, 512M, 2GiB)")
    unit = (m.group(2) or "").lower().rstrip("b")
    if unit not in _UNITS:
        raise ValueError(f"unknown size unit in {text!r}")
    return int(float(m.group(1)) * _UNITS[unit])


def default_budget() -> int:
    """A safe share of the RAM available now."""
    return int(psutil.virtual_memory().available * DEFAULT_BUDGET_SHARE)


def process_rss() -> int:
    return int(psutil.Process().memory_info().rss)


def baseline_rss() -> int:
    """RSS after handing freed heap back to the OS, so that a load's growth is not hidden by
    the allocator reusing memory an unloaded model left behind (glibc only; elsewhere as is)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return process_rss()
