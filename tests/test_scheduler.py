"""Scheduler policy on a fake engine and a fake clock: LRU, caps, pins, groups, busy models,
keep_alive, dead engines, changed settings, states. Milliseconds, no llama.cpp, no sleeps."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from server.catalog import Catalog
from server.discovery import ModelInfo
from server.engines.base import EngineOptions
from server.engines.prefix_store import PrefixStore
from server.errors import EngineFailure, ModelsBusy, ModelTooLarge
from server.events import EventBus, LmxEvent
from server.memory import MemoryEstimate
from server.scheduler import (
    TRANSITIONS,
    InvalidTransition,
    LoadedModel,
    ModelState,
    Scheduler,
    SystemClock,
)
from server.settings import ConfigStore
from tests.conftest import wait_for

MB = 1_000_000


class FakeClock:
    """Virtual time: waiting advances it instead of sleeping."""

    def __init__(self) -> None:
        self.t = 1000.0

    def now(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds

    def wait(self, cond: threading.Condition, timeout: float | None) -> None:
        self.t += 1.0 if timeout is None else timeout
        cond.wait(0)  # let other threads in, as a real wait would


class FakeEngine:
    """Just enough of the Engine protocol for the scheduler."""

    fail_loads: set[str] = set()  # noqa: RUF012

    def __init__(self, info: ModelInfo, options: EngineOptions) -> None:
        self.info, self.options = info, options
        self.on_failure: Any = None
        self.failure: str | None = None
        self.loaded = self.closed = False
        self.busy = 0

    def load(self) -> None:
        if self.info.id in self.fail_loads:
            raise EngineFailure(f"cannot load {self.info.id}")
        self.loaded = True

    def close(self) -> None:
        self.closed = True

    @property
    def alive(self) -> bool:
        return self.failure is None

    def die(self, reason: str) -> None:
        self.failure = reason
        self.on_failure(reason)

    def stats(self) -> dict[str, Any]:
        return {"slots": self.options.parallel, "slots_busy": self.busy, "queue_depth": 0}

    def cancel_all(self) -> None:
        pass


class World:
    """A scheduler over fake models of given sizes (MB), on virtual time."""

    def __init__(
        self,
        tmp_path: Path,
        sizes: dict[str, int],
        toml: str = "",
        store: PrefixStore | None = None,
        **flags: Any,
    ):
        self.cfg = tmp_path / "lmx.toml"
        self.cfg.write_text(toml)
        self.config = ConfigStore(
            path=self.cfg,
            flags={"include_default_model": False, "hf_cache": False, "user_stores": False} | flags,
            env={},
        )
        self.sizes = sizes
        self.infos = {
            m: ModelInfo(m, tmp_path / m, "fake", size * MB, format="fake")
            for m, size in sizes.items()
        }
        self.catalog = Catalog(
            self.config, sources=[lambda: list(self.infos.values())], discover_files=False
        )
        self.events = EventBus()
        self.seen: list[LmxEvent] = []
        self.events.subscribe(self.seen.append)
        self.clock = FakeClock()
        self.engines: list[FakeEngine] = []

        def factory(info: ModelInfo, options: EngineOptions) -> FakeEngine:
            e = FakeEngine(info, options)
            self.engines.append(e)
            return e

        def estimator(info: ModelInfo, options: EngineOptions) -> MemoryEstimate:
            # weights + a KV share that grows with ctx x slots, so settings matter
            kv = options.n_ctx * options.parallel * 100
            return MemoryEstimate(self.sizes[info.id] * MB, kv, 0, options.n_ctx, options.parallel)

        self.s = Scheduler(
            self.config,
            self.catalog,
            self.events,
            engine_factory=factory,  # type: ignore[arg-type]
            clock=self.clock,
            measure=lambda: 0,
            baseline=lambda: 0,
            background=False,
            estimator=estimator,
            prefix_store=store,
        )

    def lease(self, name: str, keep_alive: float | None = None) -> Any:
        return self.s.lease(self.catalog.resolve(name), keep_alive)

    def use(self, name: str) -> None:
        self.lease(name).release()

    def loaded(self) -> set[str]:
        return {lm.info.id for lm in self.s.loaded()}

    def kinds(self, kind: str) -> list[str]:
        return [e.model for e in self.seen if e.kind == kind]


def test_load_on_demand_and_the_states_it_goes_through(tmp_path: Path) -> None:
    w = World(tmp_path, {"a": 100}, max_memory=1000 * MB)
    lease = w.lease("a")
    lm = lease.model
    assert lm.state == ModelState.BUSY and lm.leases == 1 and lease.load_seconds >= 0
    assert w.kinds("loading") == ["a"] and w.kinds("loaded") == ["a"]
    lease.release()
    lease.release()  # idempotent
    assert lm.state == ModelState.READY and lm.leases == 0
    again = w.lease("a")
    assert again.model is lm and again.load_seconds == 0.0 and len(w.engines) == 1
    again.release()
    assert w.s.unload("a") and lm.state == ModelState.STOPPED and w.engines[0].closed
    assert not w.s.unload("a")


def test_transitions_are_written_down_and_enforced(tmp_path: Path) -> None:
    w = World(tmp_path, {"a": 1}, max_memory=1000 * MB)
    lm = w.lease("a").model
    assert ModelState.LOADING not in TRANSITIONS[ModelState.BUSY]
    with pytest.raises(InvalidTransition):
        w.s._transition(lm, ModelState.LOADING)
    assert TRANSITIONS[ModelState.STOPPED] == frozenset()


def test_least_recently_used_idle_model_is_evicted(tmp_path: Path) -> None:
    w = World(tmp_path, {"a": 400, "b": 400, "c": 400}, max_memory=1000 * MB)
    w.use("a")
    w.clock.advance(1)
    w.use("b")
    w.clock.advance(1)
    w.use("a")  # a used last: b is least recently used
    w.clock.advance(1)
    w.use("c")
    assert w.loaded() == {"a", "c"} and w.kinds("evicted") == ["b"]
    plan = w.s.plan(w.s.estimate_for(w.catalog.resolve("b")), exclude="b")
    assert plan.fits and plan.victims == ["a"]  # the next one to go


def test_max_loaded_models_caps_the_count(tmp_path: Path) -> None:
    w = World(tmp_path, {"a": 1, "b": 1, "c": 1}, max_memory=1000 * MB, max_loaded_models=2)
    for m in "abc":
        w.use(m)
        w.clock.advance(1)
    assert w.loaded() == {"b", "c"}


def test_a_leased_model_is_never_evicted_and_the_load_times_out(tmp_path: Path) -> None:
    w = World(tmp_path, {"a": 600, "b": 600}, max_memory=1000 * MB, load_timeout=30)
    held = w.lease("a")
    t0 = w.clock.now()
    with pytest.raises(ModelsBusy, match="a") as e:
        w.use("b")
    assert w.clock.now() - t0 >= 30  # it waited load_timeout (virtual)
    assert e.value.status == 503 and w.loaded() == {"a"} and w.kinds("load_waiting") == ["b"]
    held.release()
    w.use("b")
    assert w.loaded() == {"b"}


def test_a_waiting_load_goes_ahead_when_the_busy_model_is_released(tmp_path: Path) -> None:
    w = World(tmp_path, {"a": 600, "b": 600}, max_memory=1000 * MB, load_timeout=120)
    w.s.clock = SystemClock()  # real waits on the condition; released from this thread
    held = w.lease("a")
    result: list[Any] = []
    t = threading.Thread(target=lambda: result.append(w.lease("b")))
    t.start()
    wait_for(lambda: "b" in w.s.waiting)
    assert w.loaded() == {"a"}
    held.release()
    t.join(10)
    assert result and result[0].model.info.id == "b" and w.loaded() == {"b"}


def test_pinned_models_are_never_evicted_nor_expire(tmp_path: Path) -> None:
    w = World(
        tmp_path,
        {"a": 600, "b": 600},
        "[models.a]\npin = true\n",
        max_memory=1000 * MB,
        load_timeout=5,
        keep_alive=10,
    )
    w.use("a")
    w.clock.advance(3600)
    w.s.tick()
    assert w.loaded() == {"a"}
    with pytest.raises(ModelsBusy):
        w.use("b")
    w.s.pin("b")
    w.cfg.write_text("")
    w.config.reload()
    w.use("b")
    assert w.loaded() == {"b"} and w.s.is_pinned("b")


@pytest.mark.parametrize("exclusive", [True, False])
def test_exclusive_groups_swap(tmp_path: Path, exclusive: bool) -> None:
    flag = str(exclusive).lower()
    w = World(
        tmp_path,
        {"a": 1, "b": 1, "c": 1},
        f'[groups.one]\nmembers = ["a", "b"]\nexclusive = {flag}\n'
        f'[groups.two]\nmembers = ["c"]\nexclusive = {flag}\n',
        max_memory=1000 * MB,
    )
    w.use("a")
    w.use("b")
    assert w.loaded() == {"a", "b"}  # one group: together
    w.use("c")
    assert w.loaded() == ({"c"} if exclusive else {"a", "b", "c"})


def test_keep_alive_counts_from_the_end_of_the_last_request(tmp_path: Path) -> None:
    w = World(tmp_path, {"a": 1}, max_memory=1000 * MB, keep_alive=60)
    lease = w.lease("a")
    w.clock.advance(3600)  # longer than keep_alive, but in use
    w.s.tick()
    assert w.loaded() == {"a"} and lease.model.expires_at is None
    lease.release()
    assert lease.model.expires_in() == 60
    w.clock.advance(59)
    w.s.tick()
    assert w.loaded() == {"a"}
    w.clock.advance(2)
    assert w.s.tick() is None
    assert w.loaded() == set() and w.kinds("unloaded") == ["a"]


def test_keep_alive_zero_negative_per_request_and_per_model(tmp_path: Path) -> None:
    w = World(tmp_path, {"a": 1, "b": 1}, '[models.b]\nkeep_alive = "1h"\n', max_memory=1000 * MB)
    w.lease("a", keep_alive=0).release()
    w.s.tick()
    assert w.loaded() == set()
    w.lease("a", keep_alive=-1).release()
    w.clock.advance(10**6)
    w.s.tick()
    assert w.loaded() == {"a"}
    w.use("b")
    assert w.s.get("b").expires_in() == 3600  # type: ignore[union-attr]


def test_a_dead_engine_is_unloaded_and_the_next_request_loads_it_again(tmp_path: Path) -> None:
    w = World(tmp_path, {"a": 1}, "[models.a]\npin = true\n", max_memory=1000 * MB)
    w.use("a")
    first = w.engines[0]
    first.die("llama_decode returned -3")
    assert w.kinds("engine_failed") == ["a"]
    w.s.tick()
    assert w.loaded() == set() and first.closed
    w.use("a")  # pinned, and it recovers
    assert len(w.engines) == 2 and w.s.get("a").engine is w.engines[1]  # type: ignore[union-attr]


def test_a_request_never_gets_a_dead_engine(tmp_path: Path) -> None:
    w = World(tmp_path, {"a": 1}, max_memory=1000 * MB)
    w.use("a")
    w.engines[0].die("boom")
    lease = w.lease("a")  # before any tick: the lease itself replaces the engine
    assert lease.engine is w.engines[1] and w.engines[0].closed


def test_one_model_asked_for_at_once_loads_once(tmp_path: Path) -> None:
    w = World(tmp_path, {"a": 1}, max_memory=1000 * MB)
    w.s.clock = SystemClock()
    leases: list[Any] = []
    threads = [threading.Thread(target=lambda: leases.append(w.lease("a"))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(leases) == 8 and len(w.engines) == 1
    assert leases[0].model.leases == 8


def test_too_large_is_refused_and_a_failed_load_leaves_nothing(tmp_path: Path) -> None:
    w = World(tmp_path, {"a": 2000, "b": 1}, max_memory=1000 * MB)
    with pytest.raises(ModelTooLarge, match=r"needs about 200\d MB.*budget is 1000 MB"):
        w.use("a")
    FakeEngine.fail_loads = {"b"}
    try:
        with pytest.raises(EngineFailure):
            w.use("b")
    finally:
        FakeEngine.fail_loads = set()
    assert w.loaded() == set() and w.kinds("load_failed") == ["b"]
    w.use("b")  # nothing was left behind: it loads now
    assert w.loaded() == {"b"}


def test_changed_settings_reload_the_model_when_it_is_idle(tmp_path: Path) -> None:
    w = World(tmp_path, {"a": 1}, max_memory=1000 * MB, ctx=1024)
    lease = w.lease("a")
    w.cfg.write_text("[models.a]\nctx = 512\n")
    w.config.reload()
    lm: LoadedModel = lease.model
    assert lm.stale
    w.s.tick()
    assert w.s.get("a") is lm  # busy: it keeps serving on the old settings
    lease.release()
    w.s.tick()
    new = w.s.get("a")
    assert new is not None and new is not lm and new.options.n_ctx == 512
    assert w.kinds("reconfigured") == ["a"] and w.engines[0].closed


def test_the_prompt_cache_gets_what_loaded_models_leave(tmp_path: Path) -> None:
    store = PrefixStore(ram_limit=0)  # the scheduler sets its limit from the settings
    w = World(
        tmp_path, {"a": 300, "b": 500}, store=store, max_memory=806 * MB, prompt_cache_ram=50 * MB
    )
    assert (store.ram_limit, store.ram_cap) == (50 * MB, 50 * MB)
    w.use("a")
    assert w.engines[0].options.prefix_store is store  # every engine gets the one store
    assert store.ram_cap == 50 * MB  # a leaves about 504 MB
    assert store.put("a", [1, 2], bytearray(2 * MB)) and store.put("a", [3, 4], bytearray(2 * MB))
    w.use("b")  # a and b leave about 2.7 MB: the older prefix goes (no disk here)
    est = sum(lm.estimate.total for lm in w.s.loaded())
    assert store.ram_cap == 806 * MB - est and store.ram_bytes == 2 * MB
    assert store.lookup("a", [1, 2]) is None and store.lookup("a", [3, 4]) is not None
    w.s.unload("b")
    assert store.ram_cap == 50 * MB
    w.config.update(prompt_cache_ram=MB)  # a smaller limit applies at once
    assert store.ram_cap == MB and store.ram_bytes == 0
