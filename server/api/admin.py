"""Admin API: what is available and loaded, memory estimates, load/unload, events, metrics."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Any

import msgspec
from litestar import Controller, Response, delete, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, FromQuery, JSONBody, Parameter
from litestar.response import Stream
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)

from server import hub
from server.discovery import ModelInfo
from server.downloads import Download
from server.errors import LmxError, NotFound
from server.memory import process_rss
from server.registry import Registry, RegistryEvent
from server.telemetry import RequestRecord, SystemSampler

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _sse(event: str, data: Any) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + msgspec.json.encode(data) + b"\n\n"


def describe_model(registry: Registry, info: ModelInfo) -> dict[str, Any]:
    """One model as the admin API, `lmx ls --estimate` and the TUI see it."""
    out = info.describe()
    lm = registry.get_loaded(info.id)
    out["state"] = "available" if lm is None else lm.state
    out["pinned"] = registry.is_pinned(info.id)
    group = registry.group_of(info.id)
    out["group"] = group[0] if group else None
    if info.usable:
        est = registry.estimate_for(info)
        fits, evict = registry.plan(est.total, exclude=info.id)
        out["memory_estimate"] = est.as_dict()
        out["fits"] = fits and est.total <= registry.budget
        out["would_evict"] = evict if lm is None else []
    if lm is not None:
        st = lm.engine.stats()
        out.update(
            {
                "memory_measured": lm.measured,
                "expires_in": lm.expires_in(),
                "in_use": lm.in_use,
                "slots": st["slots"],
                "slots_busy": st["slots_busy"],
                "queue_depth": st["queue_depth"],
                "load_seconds": round(lm.load_seconds, 3),
            }
        )
        if st["slots_busy"]:
            out["state"] = "busy"
    return out


class AdminController(Controller):
    """TabbyAPI-style management over the shared registry."""

    path = "/admin"
    tags = ["admin"]  # noqa: RUF012

    @get("/models")
    async def models(self, registry: NamedDependency[Registry]) -> dict[str, Any]:
        return {
            "budget_bytes": registry.budget,
            "used_bytes": sum(lm.estimate.total for lm in registry.loaded()),
            "models": [describe_model(registry, m) for m in registry.models()],
        }

    @get("/estimate")
    async def estimate(
        self,
        registry: NamedDependency[Registry],
        model: FromQuery[str],
        ctx: Annotated[int | None, Parameter(ge=64, le=1_048_576)] = None,
        parallel: Annotated[int | None, Parameter(ge=1, le=64)] = None,
    ) -> dict[str, Any]:
        info = registry.resolve(model)
        est = registry.estimate_for(info, ctx, parallel)
        fits, evict = registry.plan(est.total, exclude=info.id)
        lm = registry.get_loaded(info.id)
        return {
            "model": info.id,
            "estimate": est.as_dict(),
            "budget_bytes": registry.budget,
            "fits": fits and est.total <= registry.budget,
            "fits_alone": est.total <= registry.budget,
            "would_evict": evict,
            "measured_bytes": lm.measured if lm else None,
        }

    @post("/models/{model_id:str}/load", status_code=200)
    async def load(self, registry: NamedDependency[Registry], model_id: FromPath[str]) -> Stream:
        info = registry.resolve(model_id)  # unknown names fail here, as a plain 404

        async def events() -> AsyncIterator[bytes]:
            yield _sse(
                "loading", {"model": info.id, "estimate": registry.estimate_for(info).as_dict()}
            )
            try:
                lm = await asyncio.to_thread(registry.ensure_loaded, info.id)
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

        return Stream(events(), media_type="text/event-stream", headers=SSE_HEADERS)

    @post("/models/{model_id:str}/unload", status_code=200)
    async def unload(
        self, registry: NamedDependency[Registry], model_id: FromPath[str]
    ) -> dict[str, Any]:
        info = registry.resolve(model_id)
        done = await asyncio.to_thread(registry.unload, info.id)
        return {"model": info.id, "unloaded": done}

    @post("/models/{model_id:str}/pin", status_code=200)
    async def pin(
        self, registry: NamedDependency[Registry], model_id: FromPath[str]
    ) -> dict[str, Any]:
        return {"model": registry.pin(model_id, True), "pinned": True}

    @post("/models/{model_id:str}/unpin", status_code=200)
    async def unpin(
        self, registry: NamedDependency[Registry], model_id: FromPath[str]
    ) -> dict[str, Any]:
        return {"model": registry.pin(model_id, False), "pinned": False}

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
        self, registry: NamedDependency[Registry], org: FromPath[str], name: FromPath[str]
    ) -> dict[str, Any]:
        listing = await asyncio.to_thread(hub.listing, f"{org}/{name}", registry.budget)
        listing.pop("_choices")
        return listing

    @post("/downloads", status_code=200)
    async def add_download(
        self, registry: NamedDependency[Registry], data: JSONBody[DownloadBody]
    ) -> dict[str, Any]:
        jobs = await asyncio.to_thread(registry.pull, data.repo, data.quant, data.file)
        return {"downloads": [j.as_dict() for j in jobs]}

    @get("/downloads")
    async def list_downloads(self, registry: NamedDependency[Registry]) -> dict[str, Any]:
        return {"downloads": [d.as_dict() for d in registry.downloads.list()]}

    @delete("/downloads/{job_id:str}", status_code=200)
    async def cancel_download(
        self, registry: NamedDependency[Registry], job_id: FromPath[str]
    ) -> dict[str, Any]:
        return _job(registry, job_id, registry.downloads.cancel).as_dict()

    @post("/downloads/{job_id:str}/pause", status_code=200)
    async def pause_download(
        self, registry: NamedDependency[Registry], job_id: FromPath[str]
    ) -> dict[str, Any]:
        return _job(registry, job_id, registry.downloads.pause).as_dict()

    @post("/downloads/{job_id:str}/resume", status_code=200)
    async def resume_download(
        self, registry: NamedDependency[Registry], job_id: FromPath[str]
    ) -> dict[str, Any]:
        return _job(registry, job_id, registry.downloads.resume).as_dict()

    @get("/events")
    async def events(self, registry: NamedDependency[Registry]) -> Stream:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue(maxsize=1000)

        def put(kind: str, data: dict[str, Any]) -> None:
            def add() -> None:
                if not queue.full():  # a slow reader loses events, never blocks the server
                    queue.put_nowait((kind, data))

            loop.call_soon_threadsafe(add)

        def on_model(ev: RegistryEvent) -> None:
            put(ev.kind, {"model": ev.model, "at": ev.at, **ev.detail})

        def on_request(rec: RequestRecord) -> None:
            put(
                "request",
                {
                    "model": rec.model,
                    "path": rec.path,
                    "status": rec.status,
                    "prompt_tokens": rec.prompt_tokens,
                    "completion_tokens": rec.completion_tokens,
                    "latency_ms": round(rec.latency_ms, 1),
                    "at": rec.at,
                },
            )

        unsubscribe = [registry.subscribe(on_model), registry.requests.subscribe(on_request)]

        async def stream() -> AsyncIterator[bytes]:
            try:
                yield b": lmx events\n\n"
                while True:
                    try:
                        kind, data = await asyncio.wait_for(queue.get(), timeout=15)
                    except TimeoutError:
                        yield b": keep-alive\n\n"
                        continue
                    yield _sse(kind, data)
            finally:
                for fn in unsubscribe:
                    fn()

        return Stream(stream(), media_type="text/event-stream", headers=SSE_HEADERS)


class DownloadBody(msgspec.Struct, kw_only=True):
    """`repo` with an optional `quant` (Q4_K_M) or `file`; neither: the recommended one."""

    repo: str
    quant: str | None = None
    file: str | None = None


def _job(registry: Registry, job_id: str, action: Any) -> Download:
    try:
        return action(job_id)  # type: ignore[no-any-return]
    except KeyError as e:
        raise NotFound(f"no download {job_id!r}", param="id") from e


# ----- Prometheus ----------------------------------------------------------------------------


class MetricsCollector:
    """Reads the registry and the request log at scrape time; nothing is counted twice."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.system = SystemSampler()

    def collect(self) -> Any:
        reg = self.registry
        counts, per = reg.requests.totals()
        requests = CounterMetricFamily(
            "lmx_requests", "API requests by model and status", labels=["model", "status"]
        )
        for (m, status), n in sorted(counts.items()):
            requests.add_metric([m, str(status)], n)
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
        loaded = reg.loaded()
        for lm in loaded:
            st = lm.engine.stats()
            generated.add_metric([lm.info.id], st["tokens_generated"])
            queue.add_metric([lm.info.id], st["queue_depth"])
            busy.add_metric([lm.info.id], st["slots_busy"])
            memory.add_metric([lm.info.id, "estimate"], lm.estimate.total)
            memory.add_metric([lm.info.id, "measured"], lm.measured)
        yield from (generated, queue, busy, memory)
        yield GaugeMetricFamily("lmx_models_loaded", "Loaded models", value=len(loaded))
        yield GaugeMetricFamily("lmx_memory_budget_bytes", "Memory budget", value=reg.budget)
        yield GaugeMetricFamily(
            "lmx_process_resident_memory_bytes", "RSS of lmx", value=process_rss()
        )
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


def metrics_handler(registry: Registry) -> Any:
    prom = CollectorRegistry(auto_describe=False)
    prom.register(MetricsCollector(registry))

    @get("/metrics", opt={"public": False}, tags=["lmx"], include_in_schema=True)
    async def metrics() -> Response[bytes]:
        body = await asyncio.to_thread(generate_latest, prom)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    return metrics
