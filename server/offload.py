"""Which layers go to which GPU, and what stays in RAM: the estimate split per device.

It follows llama.cpp's own assignment (`llama_model::load_tensors`): a model has block_count
+ 1 offloadable layers, the repeating blocks and then the output layer; `n_gpu_layers = k`
puts the last k of them on the GPUs, split between GPUs by `tensor_split`; the token
embeddings always stay in RAM. A block's KV cache lives with the block; every GPU that holds
a layer gets a compute buffer. With `gpu_layers = -1` (auto) as many layers go as fit the free
VRAM (as Ollama does): the whole model on one GPU (the one with most free VRAM, or `main_gpu`)
when it fits, else spread over the GPUs by free VRAM, else as many layers as fit.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from server.engines.base import Offload
from server.gguf import GGUFHeader
from server.memory import UBATCH, MemoryEstimate
from server.units import human_size


@dataclass(frozen=True)
class LayerSizes:
    """A model's weight bytes by where llama.cpp can put them."""

    input: int  # token embeddings and other tensors outside the layers: always in RAM
    blocks: tuple[int, ...]  # each repeating layer (blk.N.*)
    output: int  # output norm and head (with tied embeddings, a copy of the token embeddings)
    tied: int  # of `output`, the token embeddings copied there (RAM keeps its own)
    n_embd: int

    @property
    def units(self) -> int:
        """Offloadable layers: the blocks and the output layer (llama.cpp's n_layer + 1)."""
        return len(self.blocks) + 1

    def unit(self, i: int) -> int:
        return self.blocks[i] if i < len(self.blocks) else self.output

    @classmethod
    def from_header(cls, header: GGUFHeader) -> LayerSizes | None:
        """From the GGUF tensor table; None when the header names no layers."""
        n_blocks = int(header.arch_value("block_count", 0) or 0)
        if n_blocks <= 0:
            return None
        n_embd = int(header.arch_value("embedding_length", 0) or 0)
        sizes = [t.n_bytes for t in header.tensors]
        if not sizes or any(n is None for n in sizes):
            # A tensor type this reader does not know: spread the weights evenly instead.
            each = header.weights_bytes // (n_blocks + 1)
            return cls(0, (each,) * n_blocks, each, 0, n_embd)
        blocks = [0] * n_blocks
        inp = out = tied = 0
        has_head = any(t.name == "output.weight" for t in header.tensors)
        for t in header.tensors:
            nb = t.n_bytes or 0
            parts = t.name.split(".")
            if parts[0] == "blk" and len(parts) > 1 and parts[1].isdigit():
                i = int(parts[1])
                if i < n_blocks:
                    blocks[i] += nb
                    continue
            if parts[0] in ("output", "output_norm"):
                out += nb
                continue
            inp += nb  # token_embd, rope_freqs, extra (MTP) layers: kept in RAM here
            if t.name == "token_embd.weight" and not has_head:
                tied = nb  # llama.cpp duplicates it onto the output layer's device
        return cls(inp, tuple(blocks), out + tied, tied, n_embd)


@dataclass(frozen=True)
class GpuRoom:
    """What one GPU can take for the model being placed."""

    index: int
    name: str
    free: int  # bytes


@dataclass(frozen=True)
class Placement:
    """Where a model's bytes go: layers offloaded, bytes per GPU, what stays in RAM."""

    layers: int  # offloaded (llama.cpp's n_gpu_layers)
    units: int  # offloadable: block_count + 1
    gpu: tuple[tuple[int, int], ...]  # (GPU index, bytes) for each GPU that holds a layer
    moved: int  # bytes of the estimate that leave RAM
    host_compute: int  # compute buffer RAM keeps besides
    main_gpu: int | None  # one GPU alone (llama.cpp's split_mode none)
    tensor_split: tuple[float, ...]  # spread: each GPU's share, by CUDA index
    auto: bool  # gpu_layers -1: chosen to fit
    fits: bool  # False: an explicit gpu_layers needs more VRAM than the GPU has
    note: str  # what was chosen and why, for people

    def devices(self, total: int) -> dict[str, int]:
        """Bytes per device, for an estimate of `total` bytes."""
        out = {"ram": max(0, total - self.moved) + self.host_compute}
        out.update({f"gpu{i}": b for i, b in self.gpu})
        return out

    @property
    def offload(self) -> Offload:
        """What the engine is told."""
        return Offload(self.layers, self.main_gpu, self.tensor_split)

    def as_dict(self) -> dict[str, Any]:
        return {
            "gpu_layers": self.layers,
            "layers": self.units,
            "auto": self.auto,
            "main_gpu": self.main_gpu,
            "tensor_split": list(self.tensor_split),
            "fits": self.fits,
            "note": self.note,
        }


@dataclass(frozen=True)
class _Layout:
    """GPUs in llama.cpp's device order and each one's share of the offloaded layers."""

    rooms: tuple[GpuRoom, ...]
    shares: tuple[float, ...]
    single: bool


def place(
    est: MemoryEstimate,
    sizes: LayerSizes,
    rooms: Sequence[GpuRoom],
    *,
    gpu_layers: int = -1,
    main_gpu: int | None = None,
) -> Placement:
    """Split `est` between RAM and the GPUs in `rooms` (what each can take now).

    gpu_layers -1: as many layers as fit; N: N layers (clamped to block_count + 1), marked
    `fits=False` when they need more than a GPU's room. `main_gpu`: that GPU alone."""
    units = sizes.units
    auto = gpu_layers < 0
    rooms = sorted(rooms, key=lambda r: r.index)
    if not rooms:
        return on_host(est, sizes, "no GPU", auto=auto)
    if main_gpu is not None and all(r.index != main_gpu for r in rooms):
        there = ", ".join(str(r.index) for r in rooms)
        note = f"main_gpu {main_gpu} is not a GPU here (GPUs: {there}): everything in RAM"
        return on_host(est, sizes, note, auto=auto)
    if not auto and gpu_layers == 0:
        return on_host(est, sizes, "gpu_layers 0: everything in RAM", auto=False)
    want = units if auto else min(gpu_layers, units)
    best = max(rooms, key=lambda r: (r.free, -r.index))
    if main_gpu is not None:
        best = next(r for r in rooms if r.index == main_gpu)
    single = _Layout((best,), (1.0,), True)
    layouts = [single]
    if main_gpu is None and len(rooms) > 1 and sum(r.free for r in rooms) > 0:
        total_free = sum(r.free for r in rooms)
        layouts.append(_Layout(tuple(rooms), tuple(r.free / total_free for r in rooms), False))
    for layout in layouts:
        if _fits(est, sizes, layout, want):
            return _placement(est, sizes, layout, want, auto, True)
    if not auto:  # honoured as asked: the estimate says it does not fit
        return _placement(est, sizes, layouts[-1], want, False, False)
    k, layout = max(((_most(est, sizes, lay, want), lay) for lay in layouts), key=lambda t: t[0])
    if k == 0:
        free = ", ".join(f"GPU {r.index} {_size(r.free)}" for r in layout.rooms)
        return on_host(est, sizes, f"not one layer fits the free VRAM ({free}): all in RAM")
    return _placement(est, sizes, layout, k, True, True)


def on_host(est: MemoryEstimate, sizes: LayerSizes, note: str, *, auto: bool = True) -> Placement:
    """Everything in RAM, and why."""
    return Placement(0, sizes.units, (), 0, 0, None, (), auto, True, note)


def _assign(units: int, k: int, shares: Sequence[float]) -> list[tuple[int, int]]:
    """(layer, position in the layout) for each offloaded layer, as llama.cpp assigns them:
    layer il goes to the first GPU whose cumulative share exceeds (il - start) / k."""
    cum, acc = [], 0.0
    total = sum(shares) or 1.0
    for s in shares:
        acc += s
        cum.append(acc / total)
    start = units - k
    last = len(shares) - 1
    return [(il, min(bisect_right(cum, (il - start) / k), last)) for il in range(start, units)]


def _needs(est: MemoryEstimate, sizes: LayerSizes, layout: _Layout, k: int) -> list[int]:
    """Bytes each GPU of `layout` takes with k layers offloaded."""
    n_blocks = len(sizes.blocks)
    kv_block = est.kv_cache // n_blocks if n_blocks else 0
    need = [0] * len(layout.rooms)
    used = set()
    for il, pos in _assign(sizes.units, k, layout.shares):
        need[pos] += sizes.unit(il) + (kv_block if il < n_blocks else 0)
        used.add(pos)
    for pos in used:
        need[pos] += est.compute
    return need


def _fits(est: MemoryEstimate, sizes: LayerSizes, layout: _Layout, k: int) -> bool:
    need = _needs(est, sizes, layout, k)
    return all(n <= r.free for n, r in zip(need, layout.rooms, strict=True))


def _most(est: MemoryEstimate, sizes: LayerSizes, layout: _Layout, below: int) -> int:
    """The most layers (fewer than `below`) that fit `layout`; 0 when none does. A scan, not a
    bisection: over several GPUs one more layer can move others between them."""
    for k in range(below - 1, 0, -1):
        if _fits(est, sizes, layout, k):
            return k
    return 0


def _placement(
    est: MemoryEstimate, sizes: LayerSizes, layout: _Layout, k: int, auto: bool, fits: bool
) -> Placement:
    units, n_blocks = sizes.units, len(sizes.blocks)
    need = _needs(est, sizes, layout, k)
    gpu = tuple((r.index, n) for r, n in zip(layout.rooms, need, strict=True) if n)
    kv_block = est.kv_cache // n_blocks if n_blocks else 0
    offloaded = range(units - k, units)
    weights = sum(sizes.unit(il) for il in offloaded)
    if units - 1 in offloaded:
        weights -= sizes.tied  # the copy on the GPU: RAM keeps the token embeddings
    kv = kv_block * sum(1 for il in offloaded if il < n_blocks)
    # All offloaded: RAM keeps only the input embeddings' scratch; else the layers left in
    # RAM need their own.
    host_compute = 2 * 4 * UBATCH * sizes.n_embd if k == units else est.compute
    moved = weights + kv + est.compute
    split: tuple[float, ...] = ()
    main: int | None = None
    if layout.single:
        main = layout.rooms[0].index
    else:
        n = max(r.index for r in layout.rooms) + 1
        by_index = dict(zip((r.index for r in layout.rooms), layout.shares, strict=True))
        split = tuple(round(by_index.get(i, 0.0), 4) for i in range(n))
    where = _where(layout, need)
    if not fits:
        over = [
            f"{_size(n)} on GPU {r.index} but {_size(r.free)} is free"
            for r, n in zip(layout.rooms, need, strict=True)
            if n > r.free
        ]
        note = f"gpu_layers {k} needs {'; '.join(over)}: it won't fit (lower gpu_layers, or -1)"
    elif k == units:
        note = f"all {units} layers on {where}"
    elif auto:
        note = f"offloading {k}/{units} layers to {where}"
    else:
        note = f"gpu_layers {k}: {k}/{units} layers on {where}"
    return Placement(k, units, gpu, moved, host_compute, main, split, auto, fits, note)


def _where(layout: _Layout, need: Sequence[int]) -> str:
    if layout.single:
        r = layout.rooms[0]
        return f"GPU {r.index} ({r.name}): {_size(r.free)} free"
    used = [(r, n) for r, n in zip(layout.rooms, need, strict=True) if n]
    names = ", ".join(str(r.index) for r, _ in used)
    free = ", ".join(_size(r.free) for r, _ in used)
    return f"GPUs {names} by free VRAM: {free} free"


def _size(n: int) -> str:
    return human_size(n) if n > 0 else "0 B"


def placed(est: MemoryEstimate, placement: Placement) -> MemoryEstimate:
    """`est` with its split per device."""
    return replace(est, placement=placement)
