"""GPU-aware memory: the NVML inventory, the estimate split between RAM and GPUs by offloaded
layers, auto gpu_layers, per-device budgets, and what the API, CLI and TUI show.

No NVIDIA GPU exists here: NVML's Python module (`pynvml`) is faked at its seam (tests/nvml.py),
everything else is ours and real, on the real SmolLM2 GGUF. llama.cpp here is a CPU-only
build (`llama_supports_gpu_offload()` is False), so a model really loaded here stays in RAM
and lmx says so; where a test needs lmx to plan for a GPU build, it passes the scheduler
`gpu_offload=lambda: True` (as a CUDA build answers) and either loads nothing or loads on the
scheduler's fake engine. Tests that need a real GPU are marked `gpu` and skipped without one.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.catalog import Catalog
from server.discovery import ModelInfo
from server.engines.base import EngineOptions, Offload
from server.errors import ModelTooLarge
from server.events import EventBus, LmxEvent
from server.gguf import GGUFHeader, read_gguf
from server.gpus import VRAM_RESERVE, Gpu, GpuInventory
from server.memory import UBATCH, MemoryEstimate, estimate
from server.offload import GpuRoom, LayerSizes, place, placed
from server.runner import ServerThread
from server.runtime import Runtime
from server.scheduler import Scheduler
from server.settings import ConfigError, ConfigStore
from server.telemetry import SystemSampler
from tests.conftest import make_config
from tests.nvml import FakeGpu, FakeNvml
from tests.test_scheduler import FakeClock, FakeEngine

MB = 1_000_000
GB = 1_000_000_000
SMOL = "smollm2-135m-instruct.q4_1"
N_BLOCKS = 30  # SmolLM2-135M's block_count; llama.cpp offloads 31 layers (+ the output layer)


# ----- the seam --------------------------------------------------------------------------


@pytest.fixture
def nvml(monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    """The fake `pynvml` in sys.modules, with no GPU until a test adds some."""
    fake = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake.module())
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return fake


@pytest.fixture(scope="module")
def header(smollm2_path: Path) -> GGUFHeader:
    return read_gguf(smollm2_path)


@pytest.fixture(scope="module")
def est(header: GGUFHeader) -> MemoryEstimate:
    return estimate(header, 2048, 4)


class Smol:
    """SmolLM2's bytes as the test reads them from the tensor table, independently of
    server/offload.py: llama.cpp's layers are blk.0..29 and the output layer, which (the
    embeddings being tied) holds output_norm and a copy of token_embd."""

    def __init__(self, header: GGUFHeader, est: MemoryEstimate) -> None:
        by_name = {t.name: t.n_bytes or 0 for t in header.tensors}
        assert "output.weight" not in by_name  # tied embeddings
        self.blocks = [
            sum(b for n, b in by_name.items() if n.startswith(f"blk.{i}.")) for i in range(30)
        ]
        self.embd = by_name["token_embd.weight"]
        self.norm = by_name["output_norm.weight"]
        self.output = self.norm + self.embd
        self.kv = est.kv_cache // N_BLOCKS
        assert self.kv * N_BLOCKS == est.kv_cache
        self.compute = est.compute
        self.full = sum(self.blocks) + self.output + est.kv_cache + est.compute

    def top(self, n_blocks: int) -> int:
        """VRAM for the output layer and the last `n_blocks` blocks, with their KV cache and
        one compute buffer."""
        blocks = self.blocks[N_BLOCKS - n_blocks :]
        return self.output + sum(blocks) + n_blocks * self.kv + self.compute


@pytest.fixture(scope="module")
def smol(header: GGUFHeader, est: MemoryEstimate) -> Smol:
    return Smol(header, est)


# ----- the inventory ---------------------------------------------------------------------


def test_inventory_reads_each_gpu(nvml: FakeNvml) -> None:
    nvml.gpus = [FakeGpu("NVIDIA H100", 80 * GB, 70 * GB), FakeGpu("NVIDIA L4", 24 * GB, 5 * GB)]
    inv = GpuInventory()
    assert inv.gpus() == [
        Gpu(0, "NVIDIA H100", 80 * GB, 70 * GB),
        Gpu(1, "NVIDIA L4", 24 * GB, 5 * GB),
    ]
    assert inv.note == "" and inv.gpus()[1].device == "gpu1"


def test_inventory_is_cached_until_it_is_stale_or_invalidated(nvml: FakeNvml) -> None:
    nvml.gpus = [FakeGpu("NVIDIA T4", 16 * GB, 10 * GB)]
    clock = FakeClock()
    inv = GpuInventory(ttl=2.0, clock=clock.now)
    assert inv.gpus()[0].free == 10 * GB
    nvml.gpus[0].free = 4 * GB
    clock.advance(1.0)
    assert inv.gpus()[0].free == 10 * GB and nvml.reads == 1  # within the ttl: no reading
    clock.advance(1.0)
    assert inv.gpus()[0].free == 4 * GB and nvml.reads == 2
    nvml.gpus[0].free = 3 * GB
    inv.invalidate()  # a load or unload moved free VRAM
    assert inv.gpus()[0].free == 3 * GB and nvml.inits == 1  # NVML is initialized once


@pytest.mark.parametrize(
    ("fault", "note"),
    [
        ("init", "no NVIDIA GPU (Driver Not Loaded)"),
        ("memory", "no NVIDIA GPU (NVML: GPU is lost)"),
        ("missing", "no NVIDIA GPU (nvidia-ml-py missing)"),
        ("none", "no NVIDIA GPU"),
    ],
)
def test_no_gpu_driver_or_nvml_error_is_an_empty_list_never_a_crash(
    nvml: FakeNvml, monkeypatch: pytest.MonkeyPatch, fault: str, note: str
) -> None:
    if fault != "none":
        nvml.gpus = [FakeGpu("NVIDIA T4", 16 * GB, 10 * GB)]
    if fault == "init":
        nvml.init_error = "Driver Not Loaded"
    elif fault == "memory":
        nvml.memory_error = "GPU is lost"
    elif fault == "missing":
        monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    inv = GpuInventory()
    assert inv.gpus() == [] and inv.note == note


@pytest.mark.parametrize(
    ("visible", "names"),
    [
        ("1", ["B"]),
        ("2,0", ["C", "A"]),
        ("0,7,2", ["A"]),  # CUDA stops at the first entry that names no GPU
        ("GPU-cc", ["C"]),  # a UUID prefix
        ("", []),
    ],
)
def test_cuda_visible_devices_decides_which_gpus_and_their_numbers(
    nvml: FakeNvml, monkeypatch: pytest.MonkeyPatch, visible: str, names: list[str]
) -> None:
    nvml.gpus = [FakeGpu(n, 8 * GB, 8 * GB, uuid=f"GPU-{n.lower() * 2}-1") for n in "ABC"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    gpus = GpuInventory().gpus()
    assert [g.name for g in gpus] == names
    assert [g.index for g in gpus] == list(range(len(names)))  # CUDA's ordinals
    # The gauges (TUI, /metrics) number the same GPUs the same way as the budget.
    sampled = SystemSampler().sample().gpus
    assert [(g.index, g.name) for g in sampled] == [(g.index, g.name) for g in gpus]


# ----- the split -------------------------------------------------------------------------


def test_layer_sizes_from_the_real_header(header: GGUFHeader, smol: Smol) -> None:
    sizes = LayerSizes.from_header(header)
    assert sizes is not None and sizes.units == N_BLOCKS + 1
    assert list(sizes.blocks) == smol.blocks
    assert sizes.output == smol.output and sizes.tied == smol.embd and sizes.input == smol.embd
    # Every weight byte is somewhere, the duplicated embeddings once more.
    assert sizes.input + sum(sizes.blocks) + sizes.output - sizes.tied == header.weights_bytes


def test_all_layers_fit_one_gpu(header: GGUFHeader, est: MemoryEstimate, smol: Smol) -> None:
    sizes = LayerSizes.from_header(header)
    assert sizes is not None
    p = place(est, sizes, [GpuRoom(0, "NVIDIA T4", 10 * GB)])
    devices = placed(est, p).by_device()
    assert p.layers == 31 and p.fits and p.offload == Offload(31, main_gpu=0)
    assert devices["gpu0"] == smol.full
    # RAM keeps the token embeddings (llama.cpp never offloads the input layer) and the
    # input's scratch: two ubatch x n_embd float buffers.
    assert devices["ram"] == smol.embd + 2 * 4 * UBATCH * 576
    assert p.note == "all 31 layers on GPU 0 (NVIDIA T4): 10.0 GB free"


def test_partial_offload_takes_as_many_layers_as_fit(
    header: GGUFHeader, est: MemoryEstimate, smol: Smol
) -> None:
    sizes = LayerSizes.from_header(header)
    assert sizes is not None
    room = smol.top(12) + smol.blocks[17] // 2  # the output layer and 12 blocks, not 13
    p = place(est, sizes, [GpuRoom(0, "NVIDIA T4", room)])
    devices = placed(est, p).by_device()
    assert p.layers == 13 and p.auto and p.fits
    assert devices["gpu0"] == smol.top(12)
    # RAM: everything but those blocks, their KV and the output norm (the embeddings stay),
    # and its own compute buffer for the 18 blocks left on the CPU.
    moved = smol.norm + sum(smol.blocks[18:]) + 12 * smol.kv
    assert devices["ram"] == est.total - moved
    assert p.note.startswith("offloading 13/31 layers to GPU 0 (NVIDIA T4): ")
    none = place(est, sizes, [GpuRoom(0, "small", smol.top(0) - 1)])  # not even the output
    assert none.layers == 0 and placed(est, none).by_device() == {"ram": est.total}
    assert none.note.startswith("not one layer fits the free VRAM")


def test_spread_over_two_gpus_by_free_vram(
    header: GGUFHeader, est: MemoryEstimate, smol: Smol
) -> None:
    sizes = LayerSizes.from_header(header)
    assert sizes is not None
    rooms = [GpuRoom(0, "A", 220 * MB), GpuRoom(1, "B", 180 * MB)]
    assert smol.full > 220 * MB  # neither holds it alone
    p = place(est, sizes, rooms)
    devices = placed(est, p).by_device()
    assert p.layers == 31 and p.main_gpu is None and p.tensor_split == (0.55, 0.45)
    # llama.cpp's rule: layer i goes to the first GPU whose cumulative share exceeds i / 31;
    # 17/31 < 0.55 <= 18/31, so blocks 0-17 go to GPU 0, the rest and the output to GPU 1.
    assert devices["gpu0"] == sum(smol.blocks[:18]) + 18 * smol.kv + smol.compute
    assert devices["gpu1"] == smol.top(12)
    assert devices["gpu0"] <= 220 * MB and devices["gpu1"] <= 180 * MB
    assert devices["ram"] == smol.embd + 2 * 4 * UBATCH * 576
    assert p.note.startswith("all 31 layers on GPUs 0, 1 by free VRAM")


def test_one_gpu_when_it_fits_the_one_with_most_free(
    header: GGUFHeader, est: MemoryEstimate, smol: Smol
) -> None:
    sizes = LayerSizes.from_header(header)
    assert sizes is not None
    p = place(est, sizes, [GpuRoom(0, "small", 100 * MB), GpuRoom(1, "big", 1 * GB)])
    assert p.offload == Offload(31, main_gpu=1)
    assert placed(est, p).by_device() == {
        "ram": smol.embd + 2 * 4 * UBATCH * 576,
        "gpu1": smol.full,
    }


def test_main_gpu_is_honoured(header: GGUFHeader, est: MemoryEstimate, smol: Smol) -> None:
    sizes = LayerSizes.from_header(header)
    assert sizes is not None
    rooms = [GpuRoom(0, "big", 1 * GB), GpuRoom(1, "small", 400 * MB)]
    p = place(est, sizes, rooms, main_gpu=1)
    assert p.offload == Offload(31, main_gpu=1) and set(placed(est, p).by_device()) == {
        "ram",
        "gpu1",
    }
    # Too small for all of it: as many layers as fit on GPU 1, never spread onto GPU 0.
    rooms = [GpuRoom(0, "big", 1 * GB), GpuRoom(1, "small", smol.top(5))]
    p = place(est, sizes, rooms, main_gpu=1)
    assert p.offload == Offload(6, main_gpu=1) and "gpu0" not in placed(est, p).by_device()
    missing = place(est, sizes, rooms, main_gpu=3)
    assert missing.layers == 0 and "main_gpu 3 is not a GPU here (GPUs: 0, 1)" in missing.note


def test_explicit_gpu_layers_are_honoured_and_overflow_says_it_wont_fit(
    header: GGUFHeader, est: MemoryEstimate, smol: Smol
) -> None:
    sizes = LayerSizes.from_header(header)
    assert sizes is not None
    room = [GpuRoom(0, "NVIDIA T4", 100 * MB)]
    five = place(est, sizes, room, gpu_layers=5)
    assert five.offload == Offload(5, main_gpu=0) and five.fits and not five.auto
    assert placed(est, five).by_device()["gpu0"] == smol.top(4)
    assert five.note.startswith("gpu_layers 5: 5/31 layers on GPU 0")
    over = place(est, sizes, room, gpu_layers=99)  # more than the model has: all of them
    assert over.layers == 31 and not over.fits
    assert placed(est, over).by_device()["gpu0"] == smol.full
    assert f"gpu_layers 31 needs {smol.full / MB:.1f} MB on GPU 0 but 100.0 MB" in over.note
    assert "it won't fit" in over.note
    zero = place(est, sizes, room, gpu_layers=0)
    assert zero.layers == 0 and placed(est, zero).by_device() == {"ram": est.total}


# ----- the scheduler: per-device budgets and auto gpu_layers ---------------------------------


class GpuWorld:
    """A scheduler over copies of the real SmolLM2 (real headers, real estimates) on the
    policy tests' fake engine and clock, with the fake NVML. The fake engine takes and gives
    back VRAM on the fake GPUs as llama.cpp would: what the estimate put on each GPU."""

    def __init__(
        self,
        tmp_path: Path,
        smollm2_path: Path,
        nvml: FakeNvml,
        toml: str = "",
        ram: int = 8 * GB,
    ):
        for name in ("a", "b"):
            os.link(smollm2_path, tmp_path / f"{name}.gguf")
        cfg = tmp_path / "lmx.toml"
        cfg.write_text(toml)
        flags = {"include_default_model": False, "hf_cache": False, "user_stores": False}
        self.config = ConfigStore(
            path=cfg,
            flags={**flags, "model_dirs": [tmp_path], "ctx": 2048, "parallel": 4},
            env={},
        )
        self.catalog = Catalog(self.config)
        self.events = EventBus()
        self.seen: list[LmxEvent] = []
        self.events.subscribe(self.seen.append)
        self.nvml = nvml
        self.engines: dict[str, FakeEngine] = {}
        world = self

        class VramEngine(FakeEngine):
            def load(self) -> None:
                super().load()
                loading = [e for e in world.seen if e.kind == "loading"][-1]
                self.vram = {d: b for d, b in loading.detail["devices"].items() if d != "ram"}
                for d, b in self.vram.items():
                    world.nvml.gpus[int(d[3:])].free -= b

            def close(self) -> None:
                super().close()
                for d, b in self.vram.items():
                    world.nvml.gpus[int(d[3:])].free += b

        def factory(info: ModelInfo, options: EngineOptions) -> FakeEngine:
            self.engines[info.id] = VramEngine(info, options)
            return self.engines[info.id]

        self.s = Scheduler(
            self.config,
            self.catalog,
            self.events,
            engine_factory=factory,  # type: ignore[arg-type]
            clock=FakeClock(),
            measure=lambda: 0,
            baseline=lambda: 0,
            background=False,
            ram_default=ram,
            gpus=GpuInventory(),
            gpu_offload=lambda: True,  # as a CUDA build of llama.cpp answers
        )

    def use(self, name: str) -> None:
        self.s.lease(self.catalog.resolve(name)).release()

    def kinds(self, kind: str) -> list[str]:
        return [e.model for e in self.seen if e.kind == kind]


def test_auto_gpu_layers_for_smollm2(
    tmp_path: Path,
    smollm2_path: Path,
    nvml: FakeNvml,
    smol: Smol,
    caplog: pytest.LogCaptureFixture,
) -> None:
    free = VRAM_RESERVE + smol.top(12) + smol.blocks[17] // 2
    nvml.gpus = [FakeGpu("NVIDIA T4", 16 * GB, free)]
    w = GpuWorld(tmp_path, smollm2_path, nvml)
    assert w.s.budgets() == {"ram": 8 * GB, "gpu0": free - VRAM_RESERVE}
    est = w.s.estimate_for(w.catalog.resolve("a"))
    assert est.placement is not None and est.placement.layers == 13
    assert est.as_dict()["offload"]["note"].startswith("offloading 13/31 layers to GPU 0")
    with caplog.at_level(logging.INFO, logger="server.scheduler"):
        w.use("a")
    assert w.engines["a"].options.offload == Offload(13, main_gpu=0)
    assert "a: offloading 13/31 layers to GPU 0 (NVIDIA T4)" in caplog.text
    # The model now holds that VRAM; lmx's budget for the GPU is unchanged by it.
    assert nvml.gpus[0].free == free - smol.top(12)
    w.s.gpus.invalidate()
    assert w.s.budgets()["gpu0"] == free - VRAM_RESERVE


def test_a_model_that_fits_ram_but_not_vram_offloads_fewer_layers_rather_than_evicting(
    tmp_path: Path, smollm2_path: Path, nvml: FakeNvml, smol: Smol
) -> None:
    free = VRAM_RESERVE + smol.full + smol.top(3)  # all of one model, and 4 layers of another
    nvml.gpus = [FakeGpu("NVIDIA T4", 16 * GB, free)]
    w = GpuWorld(tmp_path, smollm2_path, nvml)
    w.use("a")
    w.use("b")
    assert w.engines["a"].options.offload == Offload(31, main_gpu=0)
    assert w.engines["b"].options.offload == Offload(4, main_gpu=0)
    assert w.kinds("evicted") == [] and {lm.info.id for lm in w.s.loaded()} == {"a", "b"}
    plan = w.s.plan(MemoryEstimate(0, 0, 0, 64, 1))
    assert plan.free["gpu0"] == 0  # every byte of the budget is placed


def test_when_ram_is_short_auto_evicts_an_idle_model_for_its_vram(
    tmp_path: Path, smollm2_path: Path, nvml: FakeNvml, smol: Smol
) -> None:
    # VRAM for one whole model and 4 layers of another; RAM for the two when both are wholly
    # on the GPU, not for one with only 4 layers there.
    nvml.gpus = [FakeGpu("NVIDIA T4", 16 * GB, VRAM_RESERVE + smol.full + smol.top(3))]
    in_ram = smol.embd + 2 * 4 * UBATCH * 576  # what RAM keeps of a wholly offloaded model
    w = GpuWorld(tmp_path, smollm2_path, nvml, ram=2 * in_ram + 10 * MB)
    w.use("a")
    est_b = w.s.estimate_for(w.catalog.resolve("b"))
    assert est_b.placement is not None and est_b.placement.layers == 4
    assert est_b.by_device()["ram"] > 10 * MB + in_ram  # as placed now, b does not fit RAM
    w.use("b")
    assert w.kinds("evicted") == ["a"]
    assert w.engines["b"].options.offload == Offload(31, main_gpu=0)


def test_explicit_gpu_layers_evicts_an_idle_model_for_vram(
    tmp_path: Path, smollm2_path: Path, nvml: FakeNvml, smol: Smol
) -> None:
    free = VRAM_RESERVE + smol.full + smol.top(3)
    nvml.gpus = [FakeGpu("NVIDIA T4", 16 * GB, free)]
    w = GpuWorld(tmp_path, smollm2_path, nvml, '[models."b"]\ngpu_layers = 31\n')
    w.use("a")  # auto: all 31 layers
    w.use("b")  # asks for 31: a's VRAM is needed, and a is idle
    assert w.kinds("evicted") == ["a"]
    assert w.engines["b"].options.offload == Offload(31, main_gpu=0)


def test_explicit_gpu_layers_beyond_the_vram_is_refused_before_loading(
    tmp_path: Path, smollm2_path: Path, nvml: FakeNvml, smol: Smol
) -> None:
    nvml.gpus = [FakeGpu("NVIDIA T4", 16 * GB, VRAM_RESERVE + 100 * MB)]
    w = GpuWorld(tmp_path, smollm2_path, nvml, '[models."a"]\ngpu_layers = -1\nmain_gpu = 0\n')
    w.config.update(gpu_layers=31)
    info = w.catalog.resolve("b")
    est = w.s.estimate_for(info)
    assert est.placement is not None and not est.placement.fits
    assert not w.s.fits_alone(est)
    with pytest.raises(ModelTooLarge, match=r"on GPU 0 with 31/31 layers offloaded"):
        w.s.lease(info)
    assert w.engines == {}  # nothing was loaded
    # The per-model setting wins: "a" is auto and loads with what fits.
    w.use("a")
    fit = max(n for n in range(N_BLOCKS) if smol.top(n) <= 100 * MB)
    assert w.engines["a"].options.offload == Offload(fit + 1, main_gpu=0)


def test_settings_main_gpu_per_model(tmp_path: Path) -> None:
    cfg = tmp_path / "lmx.toml"
    cfg.write_text('main_gpu = 1\n[models."x"]\nmain_gpu = 0\ngpu_layers = 12\n')
    s = ConfigStore(path=cfg, flags={}, env={}).current
    assert s.for_model("main_gpu", "x") == 0 and s.for_model("main_gpu", "y") == 1
    assert s.for_model("gpu_layers", "x") == 12 and s.for_model("gpu_layers", "y") == -1
    assert ConfigStore(flags={"main_gpu": 2}, env={}).current.main_gpu == 2
    assert ConfigStore(flags={}, env={"LMX_MAIN_GPU": "3"}).current.main_gpu == 3
    cfg.write_text("main_gpu = -1\n")
    with pytest.raises(ConfigError, match="main_gpu -1 is below the minimum 0"):
        ConfigStore(path=cfg, flags={}, env={})


# ----- over HTTP -------------------------------------------------------------------------


@pytest.fixture
def cpu_build(nvml: FakeNvml) -> Iterator[tuple[ServerThread, Runtime]]:
    """lmx as it runs here: a CPU-only llama.cpp, and (fake) NVML showing one GPU."""
    nvml.gpus = [FakeGpu("NVIDIA T4", 16 * GB, 15 * GB)]
    rt = Runtime(make_config(max_memory=4 * GB))
    with ServerThread(rt) as srv:
        yield srv, rt
    rt.close()


def test_cpu_only_build_keeps_everything_in_ram_and_says_so(
    cpu_build: tuple[ServerThread, Runtime],
) -> None:
    import ollama
    import openai

    srv, rt = cpu_build
    est = httpx.get(srv.url + "/admin/estimate", params={"model": "default"}).json()
    assert est["gpus"] == [{"index": 0, "name": "NVIDIA T4", "total": 16 * GB, "free": 15 * GB}]
    assert est["offload"] is False and "built without GPU offload" in est["note"]
    assert est["budgets"] == {"ram": 4 * GB}  # no VRAM budget: llama.cpp cannot use it
    e = est["estimate"]
    assert e["devices"] == {"ram": e["total"]} and e["offload"]["gpu_layers"] == 0
    assert (
        "built without GPU offload: everything in RAM (GPU 0 (NVIDIA T4) unused)"
        in (e["offload"]["note"])
    )
    # The model loads and answers on the CPU, and Ollama's size_vram says nothing is on a GPU.
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
    reply = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Hi"}], max_tokens=3
    )
    assert reply.choices[0].message.content
    lm = rt.scheduler.get(SMOL)
    assert lm is not None and lm.options.offload == Offload(0)
    ps = ollama.Client(host=srv.url).ps()
    assert [(m.model, m.size_vram) for m in ps.models] == [(f"{SMOL}:latest", 0)]
    assert (ps.models[0].size or 0) > 0


class MonitoredEngine(FakeEngine):
    """The policy tests' fake engine with the counters the app's monitor reads."""

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "tokens_generated": 0}


@pytest.fixture
def gpu_build(nvml: FakeNvml) -> Iterator[tuple[ServerThread, Runtime]]:
    """lmx planning for a CUDA build (the capability as such a build reports it) with two
    (fake) GPUs, on the scheduler's fake engine: nothing is loaded into llama.cpp."""
    nvml.gpus = [FakeGpu("NVIDIA L4", 24 * GB, 100 * MB), FakeGpu("NVIDIA H100", 80 * GB, 70 * GB)]
    rt = Runtime(
        make_config(max_memory=4 * GB),
        engine_factory=MonitoredEngine,  # type: ignore[arg-type]
        gpu_offload=lambda: True,
    )
    with ServerThread(rt) as srv:
        yield srv, rt
    rt.close()


def test_estimate_models_and_size_vram_show_the_split(
    gpu_build: tuple[ServerThread, Runtime], smol: Smol
) -> None:
    import ollama

    srv, rt = gpu_build
    est = httpx.get(srv.url + "/admin/estimate", params={"model": "default"}).json()
    assert est["offload"] is True and est["note"] is None
    assert est["budgets"] == {
        "ram": 4 * GB,
        "gpu0": max(0, 100 * MB - VRAM_RESERVE),
        "gpu1": 70 * GB - VRAM_RESERVE,
    }
    e = est["estimate"]  # ctx 2048 x 4 slots, as the `est` fixture
    assert e["devices"] == {"ram": smol.embd + 2 * 4 * UBATCH * 576, "gpu1": smol.full}
    assert e["offload"]["gpu_layers"] == 31 and e["offload"]["main_gpu"] == 1
    assert e["offload"]["note"].startswith("all 31 layers on GPU 1 (NVIDIA H100)")
    listing = httpx.get(srv.url + "/admin/models").json()
    assert [g["name"] for g in listing["gpus"]] == ["NVIDIA L4", "NVIDIA H100"]
    assert listing["budgets"]["gpu1"] == 70 * GB - VRAM_RESERVE
    row = next(m for m in listing["models"] if m["id"] == SMOL)
    assert row["memory_estimate"]["devices"]["gpu1"] == smol.full and row["fits_alone"]
    rt.scheduler.load(rt.catalog.resolve("default"))
    after = httpx.get(srv.url + "/admin/models").json()
    assert after["used"] == {"ram": smol.embd + 2 * 4 * UBATCH * 576, "gpu1": smol.full}
    ps = ollama.Client(host=srv.url).ps()
    assert [(m.model, m.size_vram) for m in ps.models] == [(f"{SMOL}:latest", smol.full)]


def _lmx(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )


def test_lmx_ls_estimate_shows_the_gpu_column_from_a_server(
    gpu_build: tuple[ServerThread, Runtime], smol: Smol
) -> None:
    srv, _rt = gpu_build
    r = _lmx("ls", "--estimate", env={"LMX_HOST": srv.url})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == [
        "ID", "CTX", "SLOTS", "WEIGHTS", "KV", "CACHE", "COMPUTE", "TOTAL", "GPU", "FITS"
    ]  # fmt: skip
    row = next(line for line in lines if line.startswith(SMOL))
    assert f"31/31 {smol.full / MB:.1f} MB" in row and row.rstrip().endswith("yes")
    assert f"  {SMOL}: all 31 layers on GPU 1 (NVIDIA H100)" in r.stdout
    assert "GPU 1 70.0 GB" in lines[-1] or "GPU 1 69" in lines[-1]


def test_lmx_ls_estimate_on_a_cpu_only_build_says_the_gpu_is_unused(smollm2_path: Path) -> None:
    fake = Path(__file__).parent / "fake_pynvml"
    root = Path(__file__).parent.parent
    env = {
        "PYTHONPATH": os.pathsep.join([str(fake), str(root)]),
        "FAKE_NVML_GPUS": f"NVIDIA T4:{16 * GB}:{15 * GB}",
    }
    r = _lmx("ls", "--estimate", "--max-memory", "4G", env=env)
    assert r.returncode == 0, r.stderr
    row = next(line for line in r.stdout.splitlines() if line.startswith(SMOL))
    assert " 0/31 " in row
    assert "built without GPU offload: everything in RAM (GPU 0 (NVIDIA T4) unused)" in r.stdout
    assert r.stdout.splitlines()[-1] == "budget 4.0 GB (--max-memory)"


# ----- the app ---------------------------------------------------------------------------


async def test_the_budget_bar_shows_vram_when_gpus_exist(
    gpu_build: tuple[ServerThread, Runtime], smol: Smol
) -> None:
    from lmx_tui.app import LmxApp
    from tests.test_tui import frozen_system, until

    _srv, rt = gpu_build
    rt.scheduler.load(rt.catalog.resolve("default"))
    app = LmxApp(rt, system_sampler=frozen_system(), sample_interval=0.05)
    async with app.run_test(size=(100, 30)) as pilot:
        await until(pilot, lambda: "GPU 1" in str(app.query_one("#models-budget").render()))
        bar = str(app.query_one("#models-budget").render())
        gpu_line = bar[bar.index("GPU 1") :]
        assert f"{SMOL} {smol.full / MB:.1f} MB est" in gpu_line
        assert "GPU 0" in bar and "RAM 4.0 GB" in bar


# ----- on a real GPU -----------------------------------------------------------------------


def _real_gpu() -> bool:
    try:
        import llama_cpp
        import pynvml

        pynvml.nvmlInit()
        return bool(pynvml.nvmlDeviceGetCount()) and bool(llama_cpp.llama_supports_gpu_offload())
    except Exception:
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not _real_gpu(), reason="needs an NVIDIA GPU and a CUDA build of llama.cpp")
def test_estimated_vram_against_measured_on_a_real_gpu(smollm2_path: Path) -> None:
    rt = Runtime(make_config())
    try:
        info = rt.catalog.resolve("default")
        before = rt.scheduler.gpus.gpus()
        lm = rt.scheduler.load(info)
        rt.scheduler.gpus.invalidate()
        after = rt.scheduler.gpus.gpus()
        devices = lm.estimate.by_device()
        assert lm.options.offload is not None and lm.options.offload.layers == 31
        for b, a in zip(before, after, strict=True):
            est = devices.get(b.device, 0)
            measured = b.free - a.free  # the CUDA context included
            print(
                f"{b.device} {b.name}: estimated {est / MB:.0f} MB, measured {measured / MB:.0f} MB"
            )
            if est:
                assert est <= measured + VRAM_RESERVE and measured <= 2 * est + VRAM_RESERVE
    finally:
        rt.close()


def test_marker_gpu_is_registered(pytestconfig: pytest.Config) -> None:
    markers = pytestconfig.getini("markers")
    assert any(str(m).startswith("gpu:") for m in markers)
