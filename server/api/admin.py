"""Admin API: what is available and loaded, memory estimates, load/unload, events, metrics."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any

import msgspec
from litestar import Controller, Response, delete, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, FromQuery, JSONBody, Parameter, QueryParameter
from litestar.response.sse import ServerSentEventMessage
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)

from server import hub
from server.api.errors import OPENAI_ERRORS
from server.api.sse import EventStream
from server.downloads import Download
from server.engines.prefix_store import PrefixStoreStats
from server.errors import LmxError, NotFound
from server.events import LmxEvent
from server.memory import process_rss
from server.models import ModelService
from server.runtime import Runtime
from server.telemetry import RequestRecord, SystemSampler


def _sse(event: str, data: Any) -> ServerSentEventMessage:
    return ServerSentEventMessage(data=msgspec.json.encode(data).decode(), event=event)


class AdminController(Controller):
    """TabbyAPI-style management over the shared runtime."""

    path = "/admin"
    tags = ["admin"]  # noqa: RUF012
    exception_handlers = OPENAI_ERRORS
    opt = {"scope": "admin"}  # noqa: RUF012

    @get("/models")
    async def models(
        self, rt: NamedDependency[Runtime], models: NamedDependency[ModelService]
    ) -> dict[str, Any]:
        return {
            **models.memory(),
            # Off the event loop: the store's lock is held while it spills states to disk.
            "prompt_cache": (await asyncio.to_thread(rt.prefix_store.stats)).as_dict(),
            "models": await asyncio.to_thread(models.describe_all),
        }

    @get("/estimate")
    async def estimate(
        self,
        rt: NamedDependency[Runtime],
        models: NamedDependency[ModelService],
        model: FromQuery[str],
        ctx: Annotated[int | None, Parameter(ge=64, le=1_048_576)] = None,
        parallel: Annotated[int | None, Parameter(ge=1, le=64)] = None,
        hub_files: Annotated[bool, QueryParameter(name="hub")] = False,
    ) -> dict[str, Any]:
        preview, _note = await asyncio.to_thread(
            models.preview, model, ctx, parallel, ask_hub=hub_files
        )
        memory = models.memory()
        lm = rt.scheduler.get(preview.model)
        return {
            **preview.as_dict(),
            # A preset's own id (it runs on `model`, with its own defaults).
            "preset": model if rt.catalog.preset(model) is not None else None,
            "context_length": models.runs_on(model).context_length,  # what it was trained on
            "budget_bytes": memory["budget_bytes"],
            "budgets": preview.budgets,
            **{k: memory[k] for k in ("gpus", "offload", "note")},
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
    async def load(
        self,
        models: NamedDependency[ModelService],
        model_id: FromPath[str],
        ctx: Annotated[int | None, Parameter(ge=64, le=1_048_576)] = None,
    ) -> EventStream:
        return _load(models, model_id, ctx)

    @post("/models/{model_id:str}/unload", status_code=200)
    async def unload(
        self, models: NamedDependency[ModelService], model_id: FromPath[str]
    ) -> dict[str, Any]:
        return await _unload(models, model_id)

    @delete("/models/{model_id:str}", status_code=200)
    async def remove(
        self, models: NamedDependency[ModelService], model_id: FromPath[str]
    ) -> dict[str, Any]:
        return await _remove(models, model_id)

    @post("/models/{model_id:str}/pin", status_code=200)
    async def pin(
        self, models: NamedDependency[ModelService], model_id: FromPath[str]
    ) -> dict[str, Any]:
        return {"model": models.pin(model_id, True), "pinned": True}

    @post("/models/{model_id:str}/unpin", status_code=200)
    async def unpin(
        self, models: NamedDependency[ModelService], model_id: FromPath[str]
    ) -> dict[str, Any]:
        return {"model": models.pin(model_id, False), "pinned": False}

    # Ids with a slash (an upstream's `gpu/` prefix, hf.co/ORG/REPO names), written as is or
    # with %2F (which the server decodes before routing): the same actions, the last path
    # segment naming the action.
    @post("/models/{target:path}", status_code=200, include_in_schema=False)
    async def model_action(
        self,
        models: NamedDependency[ModelService],
        target: FromPath[str],
        ctx: Annotated[int | None, Parameter(ge=64, le=1_048_576)] = None,
    ) -> Response[Any]:
        # A Response of its own each: the route serves an event stream and JSON.
        model_id, _, action = target.strip("/").rpartition("/")
        if model_id and action == "load":
            return _load(models, model_id, ctx)
        if model_id and action == "unload":
            return Response(await _unload(models, model_id))
        if model_id and action in ("pin", "unpin"):
            pinned = action == "pin"
            return Response({"model": models.pin(model_id, pinned), "pinned": pinned})
        raise NotFound(f"No route for POST /admin/models/{target.strip('/')}", param=None)

    @delete("/models/{target:path}", status_code=200, include_in_schema=False)
    async def remove_path(
        self, models: NamedDependency[ModelService], target: FromPath[str]
    ) -> dict[str, Any]:
        return await _remove(models, target.strip("/"))

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
        self, models: NamedDependency[ModelService], data: JSONBody[DownloadBody]
    ) -> dict[str, Any]:
        jobs = await asyncio.to_thread(models.pull, data.repo, data.quant, data.file)
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
    async def events(self, rt: NamedDependency[Runtime]) -> EventStream:
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

        return EventStream(stream())


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


def _load(models: ModelService, model_id: str, ctx: int | None) -> EventStream:
    """Load with progress events: loading (the estimate), then loaded or error."""
    info = models.runs_on(model_id)  # unknown names fail here, as a plain 404

    async def events() -> AsyncIterator[ServerSentEventMessage]:
        yield _sse("loading", {"model": info.id, "estimate": models.estimate(info, ctx)})
        try:
            lm = await asyncio.to_thread(models.load, info.id, ctx)
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
                "ctx": lm.options.n_ctx,
            },
        )

    return EventStream(events())


async def _unload(models: ModelService, model_id: str) -> dict[str, Any]:
    info = models.runs_on(model_id)
    done = await asyncio.to_thread(models.unload, info.id)
    return {"model": info.id, "unloaded": done}


async def _remove(models: ModelService, model_id: str) -> dict[str, Any]:
    path = await asyncio.to_thread(models.remove, model_id)
    return {"removed": str(path)}
