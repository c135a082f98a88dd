"""The scheduler: which models are loaded, who holds them, what must make room, when they go.

One condition variable guards the loaded map. A request takes a `Lease` (loading the model
first if needed); a leased model is never evicted. Loads are admitted one at a time against
the memory budget (per device) and the loaded-model cap, evicting idle models least recently
used first; a load that needs busy models gone waits on the condition until `load_timeout`,
waking at least every 0.5 s (a busy model turns idle when its engine finishes its last step,
which nothing announces). keep_alive, dead engines and models whose settings changed are handled
by `tick()`, which a background thread runs whenever the next deadline is due or something is
released (and at least every second, for the same reason). The engine factory and the clock
are injected, so the policy is tested with a fake engine on virtual time.

Model states and the transitions allowed between them (as llama-swap's process states):

    loading   -> ready | stopped       loaded, or the load failed
    ready     -> busy | unloading      a lease taken; evicted, expired or unloaded
    busy      -> ready | unloading     the last lease released; forced unload (admin, dead engine)
    unloading -> stopped
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Protocol

from server.catalog import Catalog
from server.discovery import ModelInfo
from server.engines import EngineFactory, create_engine, gpu_offload_supported
from server.engines.base import Engine, EngineOptions
from server.engines.prefix_store import PrefixStore
from server.errors import EngineFailure, ModelsBusy, ModelTooLarge, ModelUnusable
from server.events import EventBus
from server.gpus import VRAM_RESERVE, Gpu, GpuInventory
from server.memory import (
    MemoryEstimate,
    baseline_rss,
    default_budget,
    estimate_by_format,
    process_rss,
    prompt_cache_ram,
)
from server.offload import GpuRoom, LayerSizes, on_host, place, placed
from server.settings import ConfigStore, Settings
from server.units import human_size

log = logging.getLogger(__name__)


def estimate_model(info: ModelInfo, options: EngineOptions) -> MemoryEstimate:
    """The memory estimate for a model (GGUF header, or an MLX directory's config and
    safetensors headers), at these options. An upstream model runs on another server: it costs
    nothing here, and so never evicts a local one."""
    if info.format == "upstream":
        return MemoryEstimate(0, 0, 0, options.n_ctx, options.parallel)
    if info.header is None and info.mlx is None:
        raise ModelUnusable(f"The model '{info.id}' has no readable header.", param="model")
    return estimate_by_format(
        info,
        options.n_ctx,
        options.parallel,
        options.cache_type_k,
        options.cache_type_v,
        options.batch_invariant,
    )


def _check_loadable(info: ModelInfo) -> None:
    # An unreachable upstream is tried all the same: it may be back, and if not its engine's
    # load says so within seconds (502), which is the answer a client of a gateway expects.
    if not info.usable and not info.unreachable:
        raise ModelUnusable(f"The model '{info.id}' cannot be loaded: {info.error}", param="model")


class ModelState(StrEnum):
    LOADING = "loading"
    READY = "ready"
    BUSY = "busy"
    UNLOADING = "unloading"
    STOPPED = "stopped"


TRANSITIONS: dict[ModelState, frozenset[ModelState]] = {
    ModelState.LOADING: frozenset({ModelState.READY, ModelState.STOPPED}),
    ModelState.READY: frozenset({ModelState.BUSY, ModelState.UNLOADING}),
    ModelState.BUSY: frozenset({ModelState.READY, ModelState.UNLOADING}),
    ModelState.UNLOADING: frozenset({ModelState.STOPPED}),
    ModelState.STOPPED: frozenset(),
}


class InvalidTransition(RuntimeError):
    """A state change the table above does not allow (a bug, never a user error)."""


class Clock(Protocol):
    """Time for the scheduler: `now` is monotonic seconds; `wait` blocks on `cond` (held)."""

    def now(self) -> float: ...

    def wait(self, cond: threading.Condition, timeout: float | None) -> None: ...


class SystemClock:
    """The real clock."""

    def now(self) -> float:
        return time.monotonic()

    def wait(self, cond: threading.Condition, timeout: float | None) -> None:
        cond.wait(timeout)


@dataclass(eq=False)
class LoadedModel:
    """One model in the loaded map (from the start of its load to the end of its unload)."""

    info: ModelInfo
    options: EngineOptions
    estimate: MemoryEstimate
    engine: Engine | None = None
    state: ModelState = ModelState.LOADING
    admitted: bool = False  # counted against the budget (its load passed admission)
    loaded_at: float = field(default_factory=time.time)
    load_seconds: float = 0.0
    measured: int = 0  # process memory growth across the load, bytes
    leases: int = 0
    last_used: float = 0.0  # clock time
    expires_at: float | None = None  # clock time; None: kept until evicted or unloaded
    stale: bool = False  # its settings changed: reload when idle
    failure: str | None = None  # its engine died
    clock: Clock = field(default_factory=SystemClock, repr=False)

    @property
    def in_use(self) -> int:
        return self.leases

    @property
    def idle(self) -> bool:
        if self.leases or self.engine is None:
            return False
        st = self.engine.stats()
        return bool(st["slots_busy"] == 0 and st["queue_depth"] == 0)

    def expires_in(self) -> float | None:
        if self.expires_at is None:
            return None
        return max(0.0, self.expires_at - self.clock.now())


@dataclass(frozen=True)
class Plan:
    """Whether a model fits now, which idle models would be evicted, and what blocks it."""

    fits: bool
    victims: list[str]
    blocked_by: list[str]  # busy or pinned models that would have to go
    need: dict[str, int]
    free: dict[str, int]


class Lease:
    """A request's hold on a loaded model; `release()` starts its keep_alive countdown."""

    def __init__(self, scheduler: Scheduler, model: LoadedModel, load_seconds: float) -> None:
        self.scheduler = scheduler
        self.model = model
        self.load_seconds = load_seconds
        self.keep_alive: float | None = None
        self._released = False
        assert model.engine is not None
        self.engine: Engine = model.engine

    @property
    def released(self) -> bool:
        return self._released

    def release(self, keep_alive: float | None = None) -> None:
        """Idempotent; `keep_alive` (seconds, 0 unloads now, negative never) overrides."""
        if not self._released:
            self._released = True
            ka = keep_alive if keep_alive is not None else self.keep_alive
            self.scheduler._release(self.model, ka)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Scheduler:
    """Loaded models, leases, admission against the budget, eviction, keep_alive. Thread-safe."""

    def __init__(
        self,
        config: ConfigStore,
        catalog: Catalog,
        events: EventBus,
        *,
        engine_factory: EngineFactory = create_engine,
        clock: Clock | None = None,
        measure: Callable[[], int] | None = None,
        baseline: Callable[[], int] | None = None,
        ram_default: int | None = None,
        background: bool = True,
        estimator: Callable[[ModelInfo, EngineOptions], MemoryEstimate] | None = None,
        prefix_store: PrefixStore | None = None,
        gpus: GpuInventory | None = None,
        gpu_offload: Callable[[], bool] | None = None,
    ) -> None:
        self.config = config
        self.catalog = catalog
        self.events = events
        self.engine_factory = engine_factory
        self.clock: Clock = clock or SystemClock()
        self._measure = measure or process_rss
        self._baseline = baseline or baseline_rss
        self._ram_default = ram_default if ram_default is not None else default_budget()
        self._cond = threading.Condition(threading.RLock())
        self._admission = threading.Lock()  # one load (and its evictions) at a time
        self._loaded: dict[str, LoadedModel] = {}
        self._pins: set[str] = set()
        self._closed = False
        self._shutting_down = False  # cancel_all() ran: lmx is stopping
        self._cancels = 0  # cancel_all() calls so far
        self._thread: threading.Thread | None = None
        self._background = background  # False: the caller runs tick() (virtual-time tests)
        self._estimator = estimator or estimate_model
        # NVIDIA GPUs (NVML) and whether the engine can use them; asked only once a GPU is seen.
        self.gpus = gpus or GpuInventory()
        self._gpu_offload = gpu_offload or gpu_offload_supported
        self._offload_ok: bool | None = None
        self.waiting: dict[str, list[str]] = {}  # loads waiting for room -> what blocks them
        # Prompt prefixes beyond the slots and across unloads, shared by every model. It lives
        # in the budget that loaded models leave: its cap follows every load and unload.
        self.prefix_store = prefix_store
        self._fit_prefix_store()
        self._unsubscribe = config.subscribe(self._on_config)

    # ----- reading ---------------------------------------------------------------------------

    @property
    def settings(self) -> Settings:
        return self.config.current

    @property
    def budget(self) -> int:
        """The RAM budget for loaded models, bytes."""
        return self.settings.max_memory or self._ram_default

    def budgets(self) -> dict[str, int]:
        """The budget per device: RAM, and each GPU's VRAM lmx may use (when the engine can
        offload to it): what is free now plus what lmx's own models take, less a reserve."""
        out = {"ram": self.budget}
        gpus = self.usable_gpus()
        if gpus:
            with self._cond:
                ours = self._vram_used()
            for g in gpus:
                out[g.device] = max(0, g.free + ours.get(g.device, 0) - VRAM_RESERVE)
        return out

    def usable_gpus(self) -> list[Gpu]:
        """The NVIDIA GPUs models may be placed on (none when llama.cpp here cannot offload)."""
        gpus = self.gpus.gpus()
        return gpus if gpus and self.offload_supported() else []

    def offload_supported(self) -> bool:
        """Whether the engine can put layers on a GPU (asked once; llama.cpp's build decides)."""
        if self._offload_ok is None:
            try:
                self._offload_ok = bool(self._gpu_offload())
            except Exception as e:  # an engine that cannot even be imported offloads nothing
                log.warning("cannot ask the engine about GPU offload: %s", e)
                self._offload_ok = False
            if not self._offload_ok and self.gpus.gpus():
                log.warning(
                    "llama.cpp here was built without GPU offload: models stay in RAM and the "
                    "GPUs go unused (README: GPU builds)"
                )
        return self._offload_ok

    def _vram_used(self, exclude: str = "") -> dict[str, int]:
        """VRAM lmx's admitted or loaded models take by estimate, per GPU. Holds the lock."""
        used: dict[str, int] = {}
        for lm in self._loaded.values():
            if lm.info.id == exclude or not (lm.admitted or lm.state != ModelState.LOADING):
                continue
            for d, b in lm.estimate.by_device().items():
                if d != "ram":
                    used[d] = used.get(d, 0) + b
        return used

    def loaded(self) -> list[LoadedModel]:
        """Models that are loaded (ready or busy)."""
        with self._cond:
            return [
                lm
                for lm in self._loaded.values()
                if lm.state in (ModelState.READY, ModelState.BUSY)
            ]

    def get(self, model_id: str) -> LoadedModel | None:
        with self._cond:
            lm = self._loaded.get(model_id)
            return lm if lm is not None and lm.engine is not None else None

    def state_of(self, model_id: str) -> str:
        with self._cond:
            lm = self._loaded.get(model_id)
            return "available" if lm is None else str(lm.state)

    def is_pinned(self, model_id: str) -> bool:
        mc = self.settings.models.get(model_id)
        return model_id in self._pins or bool(mc and mc.pin)

    def pin(self, model_id: str, on: bool = True) -> None:
        """Pinned models are never evicted and never expire."""
        with self._cond:
            (self._pins.add if on else self._pins.discard)(model_id)
            self._cond.notify_all()
        self.events.publish("pinned" if on else "unpinned", model_id)

    def options_for(self, info: ModelInfo) -> EngineOptions:
        s = self.settings
        mc = s.models.get(info.id)
        return EngineOptions(
            n_ctx=s.for_model("ctx", info.id),
            parallel=s.for_model("parallel", info.id),
            threads=s.threads,
            gpu_layers=s.for_model("gpu_layers", info.id),
            max_queue=s.max_queue,
            chat_template=mc.chat_template if mc else None,
            cache_type_k=s.for_model("cache_type_k", info.id),
            cache_type_v=s.for_model("cache_type_v", info.id),
            batch_invariant=s.for_model("batch_invariant", info.id),
            prefix_store=self.prefix_store,
            main_gpu=s.for_model("main_gpu", info.id),
        )

    def estimate_for(
        self, info: ModelInfo, ctx: int | None = None, parallel: int | None = None
    ) -> MemoryEstimate:
        """What `info` would take loaded with its settings (or this ctx / parallel)."""
        return self.placed_for(info, ctx, parallel)[1]

    def placed_for(
        self, info: ModelInfo, ctx: int | None = None, parallel: int | None = None
    ) -> tuple[EngineOptions, MemoryEstimate]:
        """The engine options and estimate for `info` with its layers placed on the GPUs as
        they are now (auto gpu_layers: as many as fit the VRAM other models leave free)."""
        _check_loadable(info)
        opts = self.options_for(info)
        if ctx or parallel:
            opts = replace(opts, n_ctx=ctx or opts.n_ctx, parallel=parallel or opts.parallel)
        return self._place(info, opts, self._estimator(info, opts))

    def _place(
        self, info: ModelInfo, opts: EngineOptions, est: MemoryEstimate, alone: bool = False
    ) -> tuple[EngineOptions, MemoryEstimate]:
        """`opts` and `est` with the layers placed; `alone`: as if no other model held VRAM."""
        if not est.total or info.header is None:
            return opts, est
        gpus = self.gpus.gpus()
        sizes = LayerSizes.from_header(info.header) if gpus else None
        if sizes is None:  # no NVIDIA GPU: gpu_layers goes to llama.cpp as set
            return opts, est
        if not self.offload_supported():
            names = ", ".join(f"GPU {g.index} ({g.name})" for g in gpus)
            note = (
                f"llama.cpp here was built without GPU offload: everything in RAM ({names} unused)"
            )
            p = on_host(est, sizes, note, auto=opts.gpu_layers < 0)
        else:
            budgets = self.budgets()
            with self._cond:
                others = self._vram_used(exclude=info.id)
            # Auto takes the VRAM free now (fewer layers rather than evicting); an explicit
            # gpu_layers may evict idle models for room, so it is measured against the budget.
            now = opts.gpu_layers < 0 and not alone
            rooms = []
            for g in gpus:
                taken = others.get(g.device, 0) if now else 0
                rooms.append(GpuRoom(g.index, g.name, budgets[g.device] - taken))
            p = place(est, sizes, rooms, gpu_layers=opts.gpu_layers, main_gpu=opts.main_gpu)
        return replace(opts, offload=p.offload), placed(est, p)

    def keep_alive_for(self, model_id: str) -> float:
        """`[models."id"]`'s keep_alive, else its source's (an upstream's), else the global."""
        mc = self.settings.models.get(model_id)
        if mc is None or mc.keep_alive is None:
            info = self.catalog.get(model_id)
            if info is not None and info.keep_alive is not None:
                return info.keep_alive
        return float(self.settings.for_model("keep_alive", model_id))

    def fits_alone(self, need: MemoryEstimate) -> bool:
        """Whether `need` fits every device's budget with nothing else loaded."""
        budgets = self.budgets()
        return all(b <= budgets.get(d, 0) for d, b in need.by_device().items())

    def plan(self, need: MemoryEstimate, exclude: str = "") -> Plan:
        """Whether `need` fits now, and the idle models (LRU first) evicted to make room."""
        with self._cond:
            others = [
                lm
                for lm in self._loaded.values()
                if lm.info.id != exclude and (lm.admitted or lm.state != ModelState.LOADING)
            ]
            budgets = self.budgets()
            used = {d: 0 for d in budgets}
            for lm in others:
                for d, b in lm.estimate.by_device().items():
                    used[d] = used.get(d, 0) + b
            want = need.by_device()
            cap = self.settings.max_loaded_models
            # Models that cost nothing here (upstream ones) are not counted against the cap.
            count = sum(1 for lm in others if lm.estimate.total)
            adds = 1 if need.total else 0

            def fits() -> bool:
                mem = all(used.get(d, 0) + b <= budgets.get(d, 0) for d, b in want.items())
                return mem and not (cap and count + adds > cap)

            victims: list[str] = []
            movable = [
                lm
                for lm in others
                if lm.state in (ModelState.READY, ModelState.BUSY)
                and lm.idle
                and not self.is_pinned(lm.info.id)
                and lm.estimate.total  # one that costs nothing frees nothing
            ]
            for lm in sorted(movable, key=lambda m: m.last_used):
                if fits():
                    break
                victims.append(lm.info.id)
                for d, b in lm.estimate.by_device().items():
                    used[d] -= b
                count -= 1
            ok = fits()
            blocked = [] if ok else [lm.info.id for lm in others if lm.info.id not in victims]
            free = {d: budgets[d] - used.get(d, 0) for d in budgets}
            return Plan(ok, victims, blocked, want, free)

    def group_rivals(self, model_id: str) -> list[LoadedModel]:
        """Loaded members of other groups, which an exclusive group's member unloads."""
        mine = self.catalog.group_of(model_id)
        if mine is None or not self.settings.groups[mine[0]].exclusive:
            return []
        out = []
        for lm in self.loaded():
            other = self.catalog.group_of(lm.info.id)
            if other is not None and other[0] != mine[0] and not self.is_pinned(lm.info.id):
                out.append(lm)
        return out

    # ----- leases ----------------------------------------------------------------------------

    def lease(self, info: ModelInfo, keep_alive: float | None = None) -> Lease:
        """Hold `info`'s model for one request, loading it first if needed (blocking).

        Raises ModelUnusable, ModelTooLarge (507), ModelsBusy (503 after load_timeout) or
        EngineFailure (the load failed)."""
        _check_loadable(info)
        while True:
            with self._cond:
                if self._closed:
                    raise EngineFailure("lmx is shutting down")
                lm = self._loaded.get(info.id)
                if lm is not None and lm.state in (ModelState.READY, ModelState.BUSY):
                    assert lm.engine is not None
                    unusable = (not lm.engine.alive) or (lm.stale and lm.leases == 0)
                    if not unusable:
                        self._shutting_down = False  # serving again (the TUI, tests)
                        lm.leases += 1
                        lm.expires_at = None
                        lm.last_used = self.clock.now()
                        if lm.state == ModelState.READY:
                            self._transition(lm, ModelState.BUSY)
                        lease = Lease(self, lm, 0.0)
                        lease.keep_alive = keep_alive
                        return lease
                elif lm is not None:  # loading or unloading: wait for it to settle
                    self.clock.wait(self._cond, 1.0)
                    continue
                else:
                    opts, est = self.placed_for(info)
                    placeholder = LoadedModel(info, opts, est, clock=self.clock)
                    self._loaded[info.id] = placeholder
            if lm is not None:  # dead engine or changed settings: unload, then load anew
                self._unload(lm, "engine_failed" if lm.failure else "reconfigured")
                continue
            t0 = time.perf_counter()
            self._load(placeholder)
            load_s = time.perf_counter() - t0
            with self._cond:
                closed = self._closed
            if closed:  # lmx began to stop during the load: nobody will unload it later
                self._unload(placeholder, "unloaded")
                raise EngineFailure("lmx is shutting down")
            with self._cond:
                if self._loaded.get(info.id) is not placeholder or placeholder.state not in (
                    ModelState.READY,
                    ModelState.BUSY,
                ):
                    continue  # unloaded (admin, shutdown) before we could use it
                lease = Lease(self, placeholder, load_s)  # _load() counted this lease
                lease.keep_alive = keep_alive
                return lease

    def load(self, info: ModelInfo) -> LoadedModel:
        """Load without holding it (admin, TUI): its keep_alive countdown starts at once."""
        lease = self.lease(info)
        lease.release()
        return lease.model

    def _release(self, lm: LoadedModel, keep_alive: float | None) -> None:
        ka = self.keep_alive_for(lm.info.id) if keep_alive is None else keep_alive
        with self._cond:
            lm.leases = max(0, lm.leases - 1)
            lm.last_used = self.clock.now()
            if lm.leases == 0 and lm.state == ModelState.BUSY:
                self._transition(lm, ModelState.READY)
                lm.expires_at = None if ka < 0 else self.clock.now() + ka
            self._cond.notify_all()

    # ----- loading and making room ---------------------------------------------------------------

    def _load(self, lm: LoadedModel) -> None:
        info = lm.info
        try:
            with self._admission:
                self._make_room(lm)
                if lm.estimate.placement is not None:
                    log.info("%s: %s", info.id, lm.estimate.placement.note)
                self.events.publish("loading", info.id, **lm.estimate.as_dict())
                rss0 = self._baseline()
                t0 = time.perf_counter()
                engine = self.engine_factory(info, lm.options)
                engine.on_failure = lambda reason, lm=lm: self._engine_failed(lm, reason)
                try:
                    engine.load()
                finally:
                    self.gpus.invalidate()  # free VRAM moved
                lm.load_seconds = time.perf_counter() - t0
                lm.measured = max(0, self._measure() - rss0)
        except BaseException as e:
            with self._cond:
                if self._loaded.get(info.id) is lm:
                    del self._loaded[info.id]
                self._transition(lm, ModelState.STOPPED)
                self._cond.notify_all()
            self._fit_prefix_store()
            if isinstance(e, EngineFailure):
                self.events.publish("load_failed", info.id, error=str(e))
            raise
        with self._cond:
            lm.engine = engine
            lm.loaded_at = time.time()
            self._transition(lm, ModelState.READY)
            # The request that loaded it holds it from this instant: were it idle for a moment,
            # another load waiting for room could evict it before its first token.
            lm.leases += 1
            lm.last_used = self.clock.now()
            lm.expires_at = None
            self._transition(lm, ModelState.BUSY)
            self._cond.notify_all()
        log.info("loaded %s in %.2fs", info.id, lm.load_seconds)
        self.events.publish("loaded", info.id, seconds=round(lm.load_seconds, 3))
        self.start()

    def _replace_layers(self, lm: LoadedModel, alone: bool = False) -> MemoryEstimate:
        """Place `lm`'s layers on the GPUs as they are now (others may have loaded or gone
        since its estimate was made). `alone`: only return the estimate with the GPUs empty."""
        if lm.estimate.placement is None:
            return lm.estimate
        base = replace(lm.estimate, placement=None)
        opts, est = self._place(lm.info, replace(lm.options, offload=None), base, alone)
        if not alone:
            lm.options, lm.estimate = opts, est
        return est

    def _make_room(self, lm: LoadedModel) -> None:
        info = lm.info
        self._replace_layers(lm)
        alone = self._replace_layers(lm, alone=True)
        budgets = self.budgets()
        too_big = [d for d, b in alone.by_device().items() if b > budgets.get(d, 0)]
        if too_big:
            raise ModelTooLarge(self._too_large(info, alone, too_big[0], budgets), param="model")
        deadline = self.clock.now() + self.settings.load_timeout
        cancels = self._cancels
        while True:
            self._replace_layers(lm)  # an eviction frees VRAM too: auto takes more layers
            est = lm.estimate
            if self._cancels != cancels or self._closed:
                # lmx is stopping: waiting out load_timeout would hold the shutdown up.
                self.waiting.pop(info.id, None)
                raise EngineFailure("lmx is shutting down")
            rivals = self.group_rivals(info.id)
            if rivals and all(r.idle for r in rivals):
                for r in rivals:
                    self._unload(r, "evicted")
                continue
            plan = self.plan(est, exclude=info.id)
            if not plan.fits and est.placement is not None and est.placement.auto:
                # Fewer layers did not make it fit in RAM: evicting idle models also frees
                # their VRAM for more layers (placed anew on the next pass).
                wide = self.plan(self._replace_layers(lm, alone=True), exclude=info.id)
                plan = wide if wide.fits and wide.victims else plan
            if plan.fits and not rivals:
                for v in plan.victims:
                    victim = self._loaded.get(v)
                    if victim is not None:
                        self._unload(victim, "evicted")
                with self._cond:
                    if self.plan(est, exclude=info.id).fits:  # nothing slipped in between
                        lm.admitted = True
                        self.waiting.pop(info.id, None)
                    else:
                        continue
                self._fit_prefix_store()  # the prompt cache makes room for it too
                return
            with self._cond:
                left = deadline - self.clock.now()
                blockers = plan.blocked_by or [r.info.id for r in rivals]
                if info.id not in self.waiting:
                    self.waiting[info.id] = blockers
                    self.events.publish("load_waiting", info.id, blocked_by=blockers)
                if left <= 0:
                    self.waiting.pop(info.id, None)
                    busy = ", ".join(blockers)
                    raise ModelsBusy(
                        f"No room for '{info.id}' ({est.total / 1e6:.0f} MB): the loaded "
                        f"models ({busy}) are serving requests or pinned and none finished "
                        f"within {self.settings.load_timeout:.0f}s. Retry later.",
                        param="model",
                    )
                # A busy model turns idle when its engine finishes the last step, which no
                # one announces (a dropped stream releases its lease before that): poll.
                self.clock.wait(self._cond, min(left, 0.5))

    def _too_large(
        self, info: ModelInfo, est: MemoryEstimate, device: str, budgets: dict[str, int]
    ) -> str:
        if device == "ram":
            return (
                f"The model '{info.id}' needs about {est.total / 1e6:.0f} MB (weights "
                f"{est.weights / 1e6:.0f} MB, KV cache {est.kv_cache / 1e6:.0f} MB, compute "
                f"{est.compute / 1e6:.0f} MB) but the memory budget is "
                f"{self.budget / 1e6:.0f} MB; lower ctx/parallel or raise --max-memory."
            )
        p = est.placement
        layers = f" with {p.layers}/{p.units} layers offloaded" if p else ""
        return (
            f"The model '{info.id}' needs about {human_size(est.by_device()[device])} on GPU "
            f"{device.removeprefix('gpu')}{layers} but lmx may use "
            f"{human_size(budgets.get(device, 0))} of it; lower gpu_layers (or -1: as many "
            f"as fit) or ctx/parallel."
        )

    # ----- unloading -----------------------------------------------------------------------

    def unload(self, model_id: str, reason: str = "unloaded") -> bool:
        """Unload a model; requests in flight on it are cancelled. False if it was not loaded."""
        with self._cond:
            while True:
                lm = self._loaded.get(model_id)
                if lm is None or lm.state in (ModelState.UNLOADING, ModelState.STOPPED):
                    return False
                if lm.state != ModelState.LOADING:
                    break
                self.clock.wait(self._cond, 1.0)
        return self._unload(lm, reason)

    def _unload(self, lm: LoadedModel, reason: str) -> bool:
        with self._cond:
            if self._loaded.get(lm.info.id) is not lm or lm.state not in (
                ModelState.READY,
                ModelState.BUSY,
            ):
                return False
            if reason in ("evicted", "expired") and not lm.idle:
                return False  # leased since it was chosen: a model in use is never evicted
            self._transition(lm, ModelState.UNLOADING)
        try:
            if lm.engine is not None:
                lm.engine.close()  # its slots' prefixes go to the prompt cache
        finally:
            self.gpus.invalidate()
            with self._cond:
                if self._loaded.get(lm.info.id) is lm:
                    del self._loaded[lm.info.id]
                self._transition(lm, ModelState.STOPPED)
                self._cond.notify_all()
            self._fit_prefix_store()
        log.info("%s %s", reason, lm.info.id)
        kind = "evicted" if reason == "evicted" else "unloaded"
        self.events.publish(kind, lm.info.id, reason=reason)
        return True

    def _engine_failed(self, lm: LoadedModel, reason: str) -> None:
        """From the engine's own thread: mark it and let tick() unload it."""
        with self._cond:
            lm.failure = reason
            self._cond.notify_all()
        log.error("%s failed: %s", lm.info.id, reason)
        self.events.publish("engine_failed", lm.info.id, error=reason)

    def why_stopped(self, model_id: str) -> str:
        """Why a generation on `model_id` was cancelled by lmx rather than by its client."""
        with self._cond:
            if self._closed or self._shutting_down:
                return "lmx is shutting down; the generation was stopped"
            lm = self._loaded.get(model_id)
            if lm is None or lm.state in (ModelState.UNLOADING, ModelState.STOPPED):
                return f"the model '{model_id}' was unloaded while generating"
        return f"the generation on '{model_id}' was stopped by the server"

    def cancel_all(self) -> None:
        """Stop every generation in flight (shutdown)."""
        with self._cond:
            self._shutting_down = True
            self._cancels += 1  # loads waiting for room give up (see _make_room)
            self._cond.notify_all()
        for lm in self.loaded():
            if lm.engine is not None:
                lm.engine.cancel_all()

    # ----- the keep_alive / health loop ---------------------------------------------------------

    @staticmethod
    def _deadline_from(now: float, keep_alive: float) -> float | None:
        return None if keep_alive < 0 else now + keep_alive

    def _deadline(self, keep_alive: float) -> float | None:
        return self._deadline_from(self.clock.now(), keep_alive)

    def _due(self) -> tuple[list[tuple[LoadedModel, str]], float | None]:
        """Work that is due now, and when the next deadline falls. Holds the lock."""
        now = self.clock.now()
        work: list[tuple[LoadedModel, str]] = []
        nxt: float | None = None
        for lm in self._loaded.values():
            if lm.state not in (ModelState.READY, ModelState.BUSY):
                continue
            if lm.failure is not None or (lm.engine is not None and not lm.engine.alive):
                work.append((lm, "engine_failed"))
            elif lm.stale and lm.idle:
                work.append((lm, "reconfigured"))
            elif self.is_pinned(lm.info.id) or lm.expires_at is None:
                continue
            elif lm.expires_at <= now and lm.idle:
                work.append((lm, "expired"))
            elif lm.expires_at > now:
                nxt = lm.expires_at if nxt is None else min(nxt, lm.expires_at)
        return work, nxt

    def tick(self) -> float | None:
        """Do what is due: unload expired idle models and dead engines, reload models whose
        settings changed. Returns the clock time of the next deadline (None: none)."""
        with self._cond:
            work, nxt = self._due()
        for lm, reason in work:
            if reason == "reconfigured":
                with self._admission:
                    if self._unload(lm, reason):
                        self.events.publish("reconfigured", lm.info.id)
                info = self.catalog.get(lm.info.id) or lm.info
                try:
                    self.load(info)
                except Exception as e:  # too big now, busy neighbours: it loads on demand later
                    log.warning("could not reload %s: %s", info.id, e)
            elif reason == "expired":
                with self._admission, self._cond:
                    still = lm.expires_at is not None and lm.expires_at <= self.clock.now()
                if still and lm.idle and not self.is_pinned(lm.info.id):
                    self._unload(lm, reason)
            else:
                self._unload(lm, reason)
        return nxt

    def start(self) -> None:
        """Run tick() in a background thread whenever something is due (idempotent)."""
        with self._cond:
            if self._thread is not None or self._closed or not self._background:
                return
            self._thread = threading.Thread(target=self._loop, name="lmx-scheduler", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            try:
                nxt = self.tick()
            except Exception:
                log.exception("scheduler tick failed")
                nxt = None
            with self._cond:
                if self._closed:
                    return
                work, nxt2 = self._due()
                if work:
                    continue
                nxt = nxt2
                timeout = None if nxt is None else max(0.0, nxt - self.clock.now())
                # Busy models become idle without a notify (their last token); poll gently.
                self.clock.wait(self._cond, 1.0 if timeout is None else min(timeout, 1.0))

    def _fit_prefix_store(self) -> None:
        """The prompt cache may use what the models loaded or admitted leave of the budget
        (and at most its own limit, which follows the budget by default)."""
        store = self.prefix_store
        if store is None:
            return
        with self._cond:
            used = sum(
                lm.estimate.by_device().get("ram", 0)
                for lm in self._loaded.values()
                if lm.admitted or lm.state != ModelState.LOADING
            )
            budget = self.budget
            limit = prompt_cache_ram(budget, self.settings.prompt_cache_ram)
        store.set_ram_cap(budget - used, limit=limit)

    def _on_config(self, old: Settings, new: Settings) -> None:
        """Settings changed: models whose engine options differ reload when next idle."""
        self._fit_prefix_store()  # the budget or the cache's own limit may have changed
        with self._cond:
            for lm in self._loaded.values():
                if lm.state in (ModelState.READY, ModelState.BUSY):
                    # Compared as configured: where the layers went is lmx's choice, not a setting.
                    if self.options_for(lm.info) != replace(lm.options, offload=None):
                        lm.stale = True
                    if lm.leases == 0 and lm.expires_at is not None:
                        # keep_alive may have changed: restart the countdown from last use
                        ka = self.keep_alive_for(lm.info.id)
                        lm.expires_at = self._deadline_from(lm.last_used, ka)
            self._cond.notify_all()

    def close(self) -> None:
        """Unload everything and stop the background thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
            # A load in flight (a SIGTERM mid-load) finishes first; its lease() sees `_closed`
            # and unloads it, so no model is left mapped as the process exits.
            deadline = time.monotonic() + 60
            while any(lm.state == ModelState.LOADING for lm in self._loaded.values()):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 1.0))
        for lm in list(self._loaded.values()):
            with contextlib.suppress(Exception):
                self._unload(lm, "unloaded")
        if thread is not None:
            thread.join(5)
        self._unsubscribe()

    # ----- state machine ---------------------------------------------------------------------

    def _transition(self, lm: LoadedModel, to: ModelState) -> None:
        if to not in TRANSITIONS[lm.state]:
            raise InvalidTransition(f"{lm.info.id}: {lm.state} -> {to} is not allowed")
        lm.state = to
