"""Admin API: what is available and loaded, memory estimates, load/unload, events, metrics."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any

import msgspec
from litestar import Controller, Response, delete, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, FromQuery, JSONBody, Parameter, QueryParameter
from litestar.response import ServerSentEvent
from litestar.response.sse import ServerSentEventMessage
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)

from server import hub
from server.api.errors import OPENAI_ERRORS
from server.discovery import ModelInfo
from server.downloads import Download
from server.engines.prefix_store import PrefixStoreStats
from server.errors import LmxError, NotFound
from server.events import LmxEvent
from server.load_preview import hub_repo, preview_load
from server.memory import process_rss
from server.runtime import Runtime
from server.telemetry import RequestRecord, SystemSampler

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _sse(event: str, data: Any) -> ServerSentEventMessage:
    return ServerSentEventMessage(data=msgspec.json.encode(data).decode(), event=event)


def describe_model(rt: Runtime, info: ModelInfo) -> dict[str, Any]:
    """One model as the admin API, `lmx ls --estimate`, `lmx ps` and the TUI see it."""
    sched = rt.scheduler
    out = info.describe()
    lm = sched.get(info.id)
    out["state"] = sched.state_of(info.id)
    out["pinned"] = sched.is_pinned(info.id)
    out["template_error"] = rt.catalog.broken(info.id)
    group = rt.catalog.group_of(info.id)
    out["group"] = group[0] if group else None
    if info.usable:
        est = lm.estimate if lm is not None else sched.estimate_for(info)
        plan = sched.plan(est, exclude=info.id)
        out["memory_estimate"] = est.as_dict()
        out["fits"] = lm is not None or plan.fits
        out["fits_alone"] = sched.fits_alone(est)
        out["would_evict"] = plan.victims if lm is None else []
    if lm is not None and lm.engine is not None:
        st = lm.engine.stats()
        out.update(
            {
                "memory_measured": lm.measured,
                "expires_in": lm.expires_in(),
                "in_use": lm.leases,
                "ctx": lm.options.n_ctx,
                "slots": st["slots"],
                "slots_busy": st["slots_busy"],
                "queue_depth": st["queue_depth"],
                "load_seconds": round(lm.load_seconds, 3),
            }
        )
        if st["slots_busy"]:
            out["state"] = "busy"
    return out


def describe_gpus(rt: Runtime) -> dict[str, Any]:
    """The NVIDIA GPUs NVML sees, whether llama.cpp here can use them, and why not."""
    sched = rt.scheduler
    gpus = sched.gpus.gpus()
    offload = bool(gpus) and sched.offload_supported()
    note = sched.gpus.note
    if gpus and not offload:
        note = "llama.cpp here was built without GPU offload: models stay in RAM"
    return {"gpus": [g.as_dict() for g in gpus], "offload": offload, "note": note or None}


def used_by_device(rt: Runtime) -> dict[str, int]:
    """What the loaded models take of each device's budget, by estimate."""
    used: dict[str, int] = {}
    for lm in rt.scheduler.loaded():
        for d, b in lm.estimate.by_device().items():
            used[d] = used.get(d, 0) + b
    return used


class AdminController(Controller):
    """TabbyAPI-style management over the shared runtime."""

    path = "/admin"
    tags = ["admin"]  # noqa: RUF012
    exception_handlers = OPENAI_ERRORS
    opt = {"scope": "admin"}  # noqa: RUF012

    @get("/models")
    async def models(self, rt: NamedDependency[Runtime]) -> dict[str, Any]:
        sched = rt.scheduler
        return {
            "budget_bytes": sched.budget,
            "used_bytes": sum(lm.estimate.total for lm in sched.loaded()),
            "budgets": sched.budgets(),
            "used": used_by_device(rt),
            **describe_gpus(rt),
            # Off the event loop: the store's lock is held while it spills states to disk.
            "prompt_cache": (await asyncio.to_thread(rt.prefix_store.stats)).as_dict(),
            "models": [describe_model(rt, m) for m in rt.catalog.models()],
        }

    @get("/estimate")
    async def estimate(
        self,
        rt: NamedDependency[Runtime],
        model: FromQuery[str],
        ctx: Annotated[int | None, Parameter(ge=64, le=1_048_576)] = None,
        parallel: Annotated[int | None, Parameter(ge=1, le=64)] = None,
        hub_files: Annotated[bool, QueryParameter(name="hub")] = False,
    ) -> dict[str, Any]:
        sched = rt.scheduler
        info = rt.catalog.resolve(model)
        files = None
        repo = hub_repo(info)
        if hub_files and repo and info.usable and not (ctx or parallel):
            with contextlib.suppress(LmxError):  # no hub: the ctx and slot options remain
                files = (await asyncio.to_thread(hub.listing, repo, sched.budget))["files"]
        preview = preview_load(sched, info, ctx, parallel, files)
        lm = sched.get(info.id)
        return {
            **preview.as_dict(),
            "budget_bytes": sched.budget,
            "budgets": preview.budgets,
            **describe_gpus(rt),
            "measured_bytes": lm.measured if lm else None,
            # What the cache holds gives way to a model that needs the room (never refused).
            "prompt_cache": (await asyncio.to_thread(rt.prefix_store.stats)).as_dict(),
        }

    # ----- requests in flight --------------------------------------------------------------

    @get("/requests")
    async def requests(
        self,
        rt: NamedDependency[Runtime],
        limit: Annotated[int, Parameter(ge=0, le=500)] = 50,
    ) -> dict[str, Any]:
        return {
            "in_flight": [s.as_dict() for s in rt.service.in_flight()],
            "recent": [_record(r) for r in reversed(rt.requests.recent(limit))] if limit else [],
        }

    @get("/requests/{request_id:str}")
    async def request_detail(
        self, rt: NamedDependency[Runtime], request_id: FromPath[str]
    ) -> dict[str, Any]:
        detail = rt.requests.detail(request_id)
        if detail is None:
            raise NotFound(f"no finished request {request_id!r} is kept", param="id")
        return detail.as_dict()

    @post("/requests/{request_id:str}/cancel", status_code=200)
    async def cancel_request(
        self, rt: NamedDependency[Runtime], request_id: FromPath[str]
    ) -> dict[str, Any]:
        if not rt.service.cancel(request_id):
            raise NotFound(f"no request {request_id!r} is in flight", param="id")
        return {"id": request_id, "cancelled": True}

    @post("/models/{model_id:str}/load", status_code=200)
    async def load(self, rt: NamedDependency[Runtime], model_id: FromPath[str]) -> ServerSentEvent:
        info = rt.catalog.resolve(model_id)  # unknown names fail here, as a plain 404

        async def events() -> AsyncIterator[ServerSentEventMessage]:
            yield _sse(
                "loading", {"model": info.id, "estimate": rt.scheduler.estimate_for(info).as_dict()}
            )
            try:
                lm = await asyncio.to_thread(rt.scheduler.load, info)
            except LmxError as e:
                yield _sse("error", {"model": info.id, "error": e.message, "status": e.status})
                return
            yield _sse(
                "loaded",
                {
                    "model": info.id,
                    "seconds": round(lm.load_seconds, 3),
                    "memory_measured": lm.measured,
                    "memory_estimate": lm.estimate.total,
                },
            )

        return ServerSentEvent(events(), headers=SSE_HEADERS)

    @post("/models/{model_id:str}/unload", status_code=200)
    async def unload(self, rt: NamedDependency[Runtime], model_id: FromPath[str]) -> dict[str, Any]:
        info = rt.catalog.resolve(model_id)
        done = await asyncio.to_thread(rt.scheduler.unload, info.id)
        return {"model": info.id, "unloaded": done}

    @delete("/models/{model_id:str}", status_code=200)
    async def remove(self, rt: NamedDependency[Runtime], model_id: FromPath[str]) -> dict[str, Any]:
        path = await asyncio.to_thread(rt.remove, model_id)
        return {"removed": str(path)}

    @post("/models/{model_id:str}/pin", status_code=200)
    async def pin(self, rt: NamedDependency[Runtime], model_id: FromPath[str]) -> dict[str, Any]:
        info = rt.catalog.resolve(model_id)
        rt.scheduler.pin(info.id, True)
        return {"model": info.id, "pinned": True}

    @post("/models/{model_id:str}/unpin", status_code=200)
    async def unpin(self, rt: NamedDependency[Runtime], model_id: FromPath[str]) -> dict[str, Any]:
        info = rt.catalog.resolve(model_id)
        rt.scheduler.pin(info.id, False)
        return {"model": info.id, "pinned": False}

    @post("/rescan", status_code=200)
    async def rescan(self, rt: NamedDependency[Runtime]) -> dict[str, Any]:
        found = await asyncio.to_thread(rt.catalog.refresh)
        return {"models": len(found)}

    # ----- hub and downloads -------------------------------------------------------------

    @get("/hub/search")
    async def hub_search(
        self,
        q: FromQuery[str],
        sort: FromQuery[str] = "downloads",
        limit: Annotated[int, Parameter(ge=1, le=100)] = 20,
    ) -> dict[str, Any]:
        return {"results": await asyncio.to_thread(hub.search, q, sort=sort, limit=limit)}

    @get("/hub/{org:str}/{name:str}/files")
    async def hub_files(
        self, rt: NamedDependency[Runtime], org: FromPath[str], name: FromPath[str]
    ) -> dict[str, Any]:
        listing = await asyncio.to_thread(hub.listing, f"{org}/{name}", rt.scheduler.budget)
        listing.pop("_choices")
        return listing

    @post("/downloads", status_code=200)
    async def add_download(
        self, rt: NamedDependency[Runtime], data: JSONBody[DownloadBody]
    ) -> dict[str, Any]:
        jobs = await asyncio.to_thread(rt.pull, data.repo, data.quant, data.file)
        return {"downloads": [j.as_dict() for j in jobs]}

    @get("/downloads")
    async def list_downloads(self, rt: NamedDependency[Runtime]) -> dict[str, Any]:
        return {"downloads": [d.as_dict() for d in rt.downloads.list()]}

    @delete("/downloads/{job_id:str}", status_code=200)
    async def cancel_download(
        self, rt: NamedDependency[Runtime], job_id: FromPath[str]
    ) -> dict[str, Any]:
        return _job(job_id, rt.downloads.cancel).as_dict()

    @post("/downloads/{job_id:str}/pause", status_code=200)
    async def pause_download(
        self, rt: NamedDependency[Runtime], job_id: FromPath[str]
    ) -> dict[str, Any]:
        return _job(job_id, rt.downloads.pause).as_dict()

    @post("/downloads/{job_id:str}/resume", status_code=200)
    async def resume_download(
        self, rt: NamedDependency[Runtime], job_id: FromPath[str]
    ) -> dict[str, Any]:
        return _job(job_id, rt.downloads.resume).as_dict()

    @get("/events")
    async def events(self, rt: NamedDependency[Runtime]) -> ServerSentEvent:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue(maxsize=1000)

        def put(kind: str, data: dict[str, Any]) -> None:
            def add() -> None:
                if not queue.full():  # a slow reader loses events, never blocks the server
                    queue.put_nowait((kind, data))

            loop.call_soon_threadsafe(add)

        def on_event(ev: LmxEvent) -> None:
            put(ev.kind, {"model": ev.model, "at": ev.at, **ev.detail})

        def on_request(rec: RequestRecord) -> None:
            put(
                "request",
                {
                    "model": rec.model,
                    "path": rec.path,
                    "source": rec.source,
                    "key": rec.key,
                    "status": rec.status,
                    "prompt_tokens": rec.prompt_tokens,
                    "completion_tokens": rec.completion_tokens,
                    "latency_ms": round(rec.latency_ms, 1),
                    "at": rec.at,
                },
            )

        unsubscribe = [rt.events.subscribe(on_event), rt.requests.subscribe(on_request)]

        async def stream() -> AsyncIterator[ServerSentEventMessage]:
            try:
                yield ServerSentEventMessage(comment="lmx events")
                while True:
                    try:
                        kind, data = await asyncio.wait_for(queue.get(), timeout=15)
                    except TimeoutError:
                        yield ServerSentEventMessage(comment="keep-alive")
                        continue
                    yield _sse(kind, data)
            finally:
                for fn in unsubscribe:
                    fn()

        return ServerSentEvent(stream(), headers=SSE_HEADERS)


class DownloadBody(msgspec.Struct, kw_only=True):
    """`repo` with an optional `quant` (Q4_K_M) or `file`; neither: the recommended one."""

    repo: str
    quant: str | None = None
    file: str | None = None


def _record(rec: RequestRecord) -> dict[str, Any]:
    out = dict(rec.__dict__)
    out["latency_ms"] = round(rec.latency_ms, 1)
    return out


def _job(job_id: str, action: Any) -> Download:
    try:
        return action(job_id)  # type: ignore[no-any-return]
    except KeyError as e:
        raise NotFound(f"no download {job_id!r}", param="id") from e


# ----- Prometheus ----------------------------------------------------------------------------


class MetricsCollector:
    """Reads the scheduler and the request log at scrape time; nothing is counted twice."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.system = SystemSampler()

    def collect(self) -> Any:
        rt = self.rt
        counts, per = rt.requests.totals()
        requests = CounterMetricFamily(
            "lmx_requests",
            "API requests by model, status and API key name",
            labels=["model", "status", "key"],
        )
        for (m, status, key), n in sorted(counts.items()):
            requests.add_metric([m, str(status), key], n)
        yield requests
        prompt = CounterMetricFamily("lmx_prompt_tokens", "Prompt tokens", labels=["model"])
        cached = CounterMetricFamily(
            "lmx_cached_prompt_tokens", "Prompt tokens reused from the cache", labels=["model"]
        )
        ttft = HistogramMetricFamily(
            "lmx_time_to_first_token_seconds", "Time to first token", labels=["model"]
        )
        latency = HistogramMetricFamily(
            "lmx_request_duration_seconds", "Request latency", labels=["model"]
        )
        for m, t in sorted(per.items()):
            prompt.add_metric([m], t.prompt_tokens)
            cached.add_metric([m], t.cached_tokens)
            for fam, h in ((ttft, t.ttft), (latency, t.latency)):
                counts_ = h.counts or [0] * len(h.bounds)
                buckets = [(str(b), c) for b, c in zip(h.bounds, counts_, strict=True)]
                fam.add_metric([m], [*buckets, ("+Inf", h.n)], h.total)
        yield from (prompt, cached, ttft, latency)

        generated = CounterMetricFamily(
            "lmx_generated_tokens", "Tokens generated", labels=["model"]
        )
        queue = GaugeMetricFamily(
            "lmx_queue_depth", "Requests waiting for a slot", labels=["model"]
        )
        busy = GaugeMetricFamily("lmx_slots_busy", "Slots decoding", labels=["model"])
        memory = GaugeMetricFamily(
            "lmx_model_memory_bytes", "Memory of loaded models", labels=["model", "kind"]
        )
        loaded = rt.scheduler.loaded()
        for lm in loaded:
            if lm.engine is None:
                continue
            st = lm.engine.stats()
            generated.add_metric([lm.info.id], st["tokens_generated"])
            queue.add_metric([lm.info.id], st["queue_depth"])
            busy.add_metric([lm.info.id], st["slots_busy"])
            memory.add_metric([lm.info.id, "estimate"], lm.estimate.total)
            memory.add_metric([lm.info.id, "measured"], lm.measured)
        yield from (generated, queue, busy, memory)
        yield GaugeMetricFamily("lmx_models_loaded", "Loaded models", value=len(loaded))
        yield GaugeMetricFamily(
            "lmx_memory_budget_bytes", "Memory budget", value=rt.scheduler.budget
        )
        yield GaugeMetricFamily(
            "lmx_process_resident_memory_bytes", "RSS of lmx", value=process_rss()
        )
        yield from prompt_cache_metrics(rt.prefix_store.stats())
        snap = self.system.sample()
        if snap.gpus:
            used = GaugeMetricFamily(
                "lmx_gpu_memory_used_bytes", "GPU memory used", labels=["gpu", "name"]
            )
            total = GaugeMetricFamily(
                "lmx_gpu_memory_total_bytes", "GPU memory", labels=["gpu", "name"]
            )
            for g in snap.gpus:
                used.add_metric([str(g.index), g.name], g.memory_used)
                total.add_metric([str(g.index), g.name], g.memory_total)
            yield used
            yield total


def prompt_cache_metrics(st: PrefixStoreStats) -> Iterator[Any]:
    """The prompt cache: held bytes and prefixes per tier, its limits, and how it served."""
    held = GaugeMetricFamily(
        "lmx_prompt_cache_bytes", "Prompt-prefix KV states held", labels=["tier"]
    )
    limit = GaugeMetricFamily(
        "lmx_prompt_cache_limit_bytes",
        "What the prompt cache may hold (RAM: its share of the budget now)",
        labels=["tier"],
    )
    entries = GaugeMetricFamily("lmx_prompt_cache_entries", "Prompt prefixes held", labels=["tier"])
    for tier, b, lim, n in (
        ("ram", st.ram_bytes, st.ram_cap, st.ram_entries),
        ("disk", st.disk_bytes, st.disk_limit, st.disk_entries),
    ):
        held.add_metric([tier], b)
        limit.add_metric([tier], lim)
        entries.add_metric([tier], n)
    yield from (held, limit, entries)
    for name, doc, value in (
        ("lmx_prompt_cache_hits", "Requests that restored a cached prefix", st.hits),
        (
            "lmx_prompt_cache_misses",
            "Lookups that restored nothing (no cached prefix, or its state failed to load)",
            st.misses,
        ),
        (
            "lmx_prompt_cache_restored_tokens",
            "Prompt tokens restored, not recomputed",
            st.restored_tokens,
        ),
        ("lmx_prompt_cache_saved", "Prefixes saved into the cache", st.saved),
        ("lmx_prompt_cache_spilled", "Prefixes spilled from RAM to disk", st.spilled),
        ("lmx_prompt_cache_dropped", "Prefixes dropped to stay within the limits", st.dropped),
    ):
        yield CounterMetricFamily(name, doc, value=value)


def metrics_handler(rt: Runtime) -> Any:
    prom = CollectorRegistry(auto_describe=False)
    prom.register(MetricsCollector(rt))

    @get("/metrics", opt={"metrics": True}, tags=["lmx"], include_in_schema=True)
    async def metrics() -> Response[bytes]:
        body = await asyncio.to_thread(generate_latest, prom)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    return metrics
