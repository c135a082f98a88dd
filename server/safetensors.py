"""Reads a safetensors file's header (tensor names, dtypes, shapes) without touching the weights.

The format: an 8-byte little-endian length N, N bytes of JSON mapping each tensor name to
`{"dtype", "shape", "data_offsets": [begin, end]}` (plus an optional `__metadata__` object of
strings), then the tensor data.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

# Bytes per element of each safetensors dtype (sub-byte types count as fractions).
DTYPE_BYTES: dict[str, float] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "F4": 0.5,
    "F6_E2M3": 0.75,
    "F6_E3M2": 0.75,
}
MAX_HEADER_BYTES = 100 * 2**20  # the reference implementation refuses larger headers


class SafetensorsError(ValueError):
    """The file is not a readable safetensors file; the message says why."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor's entry in the header."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    n_bytes: int

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


@dataclass
class SafetensorsHeader:
    """What a safetensors header says about its tensors."""

    path: Path
    tensors: dict[str, TensorEntry] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def data_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors.values())


def read_safetensors(path: str | Path) -> SafetensorsHeader:
    """Parse the header of one safetensors file. Raises SafetensorsError with a one-line reason."""
    p = Path(path)
    try:
        size = p.stat().st_size
        with p.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SafetensorsError(f"{p.name}: too short to be a safetensors file")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise SafetensorsError(
                    f"{p.name}: header length {n} does not fit the file (truncated or not "
                    "safetensors)"
                )
            raw = f.read(n)
    except OSError as e:
        raise SafetensorsError(f"{p.name}: unreadable: {e.strerror or e}") from e
    try:
        table = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{p.name}: header is not JSON ({e})") from e
    if not isinstance(table, dict):
        raise SafetensorsError(f"{p.name}: header is not a JSON object")
    header = SafetensorsHeader(p)
    meta = table.pop("__metadata__", None) or {}
    if isinstance(meta, dict):
        header.metadata = {str(k): str(v) for k, v in meta.items()}
    data_size = size - 8 - n
    for name, entry in table.items():
        try:
            dtype = str(entry["dtype"])
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise SafetensorsError(f"{p.name}: bad entry for tensor {name!r}") from e
        if not 0 <= begin <= end <= data_size:
            raise SafetensorsError(
                f"{p.name}: tensor {name!r} lies past the end of the file (truncated)"
            )
        per = DTYPE_BYTES.get(dtype)
        if per is not None and math.ceil(math.prod(shape) * per) != end - begin:
            raise SafetensorsError(
                f"{p.name}: tensor {name!r} has {end - begin} bytes for {dtype}{list(shape)}"
            )
        header.tensors[name] = TensorEntry(name, dtype, shape, end - begin)
    return header
