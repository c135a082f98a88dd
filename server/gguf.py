"""Reads a GGUF file's header (metadata and tensor table) without touching the weights."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from server.safe_text import printable

GGUF_MAGIC = b"GGUF"

# GGUF metadata value types.
_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _FLOAT32, _BOOL = range(8)
_STRING, _ARRAY, _UINT64, _INT64, _FLOAT64 = 8, 9, 10, 11, 12

_SCALARS: dict[int, struct.Struct] = {
    _UINT8: struct.Struct("<B"),
    _INT8: struct.Struct("<b"),
    _UINT16: struct.Struct("<H"),
    _INT16: struct.Struct("<h"),
    _UINT32: struct.Struct("<I"),
    _INT32: struct.Struct("<i"),
    _FLOAT32: struct.Struct("<f"),
    _BOOL: struct.Struct("<?"),
    _UINT64: struct.Struct("<Q"),
    _INT64: struct.Struct("<q"),
    _FLOAT64: struct.Struct("<d"),
}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

# ggml tensor types: id -> (name, elements per block, bytes per block).
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
}

# llama.cpp's `general.file_type` (enum llama_ftype) -> the quantization name users know.
FILE_TYPES: dict[int, str] = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    19: "IQ2_XXS",
    20: "IQ2_XS",
    21: "Q2_K_S",
    22: "IQ3_XS",
    23: "IQ3_XXS",
    24: "IQ1_S",
    25: "IQ4_NL",
    26: "IQ3_S",
    27: "IQ3_M",
    28: "IQ2_S",
    29: "IQ2_M",
    30: "IQ4_XS",
    31: "IQ1_M",
    32: "BF16",
    36: "TQ1_0",
    37: "TQ2_0",
    38: "MXFP4_MOE",
}

# Arrays longer than this (tokenizer vocabularies, merges) are skipped, only their length kept.
_MAX_KEPT_ARRAY = 64


class GGUFError(ValueError):
    """The file is not a readable GGUF model; the message says why."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry in the GGUF tensor table."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def n_bytes(self) -> int | None:
        info = GGML_TYPES.get(self.ggml_type)
        if info is None:
            return None
        _, block, size = info
        return self.n_elements // block * size


@dataclass
class GGUFHeader:
    """Metadata and tensor table of one GGUF file."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    data_offset: int
    file_size: int
    array_lengths: dict[str, int] = field(default_factory=dict)

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "unknown"))

    def arch_value(self, suffix: str, default: Any = None) -> Any:
        """An architecture-scoped key, e.g. `context_length` -> `llama.context_length`."""
        return self.metadata.get(f"{self.architecture}.{suffix}", default)

    @property
    def name(self) -> str | None:
        v = self.metadata.get("general.name")
        return str(v) if v is not None else None

    @property
    def context_length(self) -> int | None:
        v = self.arch_value("context_length")
        return int(v) if v is not None else None

    @property
    def parameter_count(self) -> int:
        v = self.metadata.get("general.parameter_count")
        if isinstance(v, int) and v > 0:
            return v
        return sum(t.n_elements for t in self.tensors)

    @property
    def quantization(self) -> str:
        ft = self.metadata.get("general.file_type")
        if isinstance(ft, int) and ft in FILE_TYPES:
            return FILE_TYPES[ft]
        # No file_type key: name the type holding most of the weights.
        by_type: dict[int, int] = {}
        for t in self.tensors:
            by_type[t.ggml_type] = by_type.get(t.ggml_type, 0) + t.n_elements
        if not by_type:
            return "unknown"
        top = max(by_type, key=lambda k: by_type[k])
        return GGML_TYPES.get(top, (f"type{top}", 1, 1))[0]

    @property
    def chat_template(self) -> str | None:
        v = self.metadata.get("tokenizer.chat_template")
        return str(v) if v is not None else None

    @property
    def vocab_size(self) -> int | None:
        return self.array_lengths.get("tokenizer.ggml.tokens")

    @property
    def weights_bytes(self) -> int:
        return self.file_size - self.data_offset


class _Reader:
    def __init__(self, f: BinaryIO, size: int) -> None:
        self.f = f
        self.size = size

    def read(self, n: int) -> bytes:
        b = self.f.read(n)
        if len(b) != n:
            raise GGUFError(f"truncated: file ends at byte {self.size} inside the header")
        return b

    def u32(self) -> int:
        return int(_U32.unpack(self.read(4))[0])

    def u64(self) -> int:
        return int(_U64.unpack(self.read(8))[0])

    def string(self) -> str:
        n = self.u64()
        if n > self.size:
            raise GGUFError(f"corrupt: string length {n} exceeds the file size")
        return self.read(n).decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        n = self.u64()
        if n > self.size:
            raise GGUFError(f"corrupt: string length {n} exceeds the file size")
        self.f.seek(n, 1)

    def value(self, vtype: int, key: str, lengths: dict[str, int]) -> Any:
        if vtype in _SCALARS:
            s = _SCALARS[vtype]
            return s.unpack(self.read(s.size))[0]
        if vtype == _STRING:
            # Metadata is shown (lmx ls, the TUI, /api/show, logs): no terminal escapes. The
            # chat template keeps its newlines; it is a program, not a label.
            return printable(self.string(), multiline=key.startswith("tokenizer.chat_template"))
        if vtype == _ARRAY:
            etype = self.u32()
            count = self.u64()
            if count > self.size:
                raise GGUFError(f"corrupt: array {key!r} claims {count} elements")
            lengths[key] = count
            if count > _MAX_KEPT_ARRAY:
                if etype in _SCALARS:
                    self.f.seek(_SCALARS[etype].size * count, 1)
                elif etype == _STRING:
                    for _ in range(count):
                        self.skip_string()
                else:
                    for _ in range(count):
                        self.value(etype, key, {})
                return None
            return [self.value(etype, key, {}) for _ in range(count)]
        raise GGUFError(f"corrupt: unknown metadata type {vtype} for key {key!r}")


def read_gguf(path: str | Path) -> GGUFHeader:
    """Parse the header of a GGUF file. Raises GGUFError with a one-line reason on bad input."""
    p = Path(path)
    try:
        size = p.stat().st_size
        f = p.open("rb")
    except OSError as e:
        raise GGUFError(f"unreadable: {e.strerror or e}") from e
    with f:
        r = _Reader(f, size)
        magic = f.read(4)
        if magic != GGUF_MAGIC:
            if len(magic) < 4:
                raise GGUFError("not a GGUF file: too short")
            raise GGUFError(f"not a GGUF file: starts with {magic!r}")
        version = r.u32()
        if version not in (2, 3):
            raise GGUFError(f"unsupported GGUF version {version}")
        n_tensors = r.u64()
        n_kv = r.u64()
        if n_tensors > size or n_kv > size:
            raise GGUFError(
                f"truncated or corrupt: the header declares {n_tensors} tensors and {n_kv} keys "
                f"but the file has {size} bytes"
            )
        metadata: dict[str, Any] = {}
        lengths: dict[str, int] = {}
        for _ in range(n_kv):
            key = printable(r.string())
            vtype = r.u32()
            value = r.value(vtype, key, lengths)
            if value is not None:
                metadata[key] = value
        tensors: list[TensorInfo] = []
        for _ in range(n_tensors):
            name = r.string()
            n_dims = r.u32()
            if n_dims > 8:
                raise GGUFError(f"corrupt: tensor {name!r} has {n_dims} dimensions")
            shape = tuple(r.u64() for _ in range(n_dims))
            ggml_type = r.u32()
            offset = r.u64()
            tensors.append(TensorInfo(name, shape, ggml_type, offset))
        alignment = metadata.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0:
            alignment = 32
        pos = f.tell()
        data_offset = (pos + alignment - 1) // alignment * alignment

    end = data_offset
    for t in tensors:
        nb = t.n_bytes
        if nb is not None:
            end = max(end, data_offset + t.offset + nb)
    if end > size:
        raise GGUFError(f"truncated: tensor data needs {end} bytes but the file has {size}")
    return GGUFHeader(p, version, metadata, tensors, data_offset, size, lengths)
