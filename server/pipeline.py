"""The one path of a request, under every front end (OpenAI, Ollama, admin, the TUI, `lmx run`).

    resolve the name (id, prefix, alias, preset) -> apply the preset -> validate ->
    lease the model (loads on demand, refreshes keep_alive and LRU) -> render the chat template
    -> check the context -> submit -> stream typed events -> release -> record

An engine that `takes_text` (an upstream server) gets the messages or prompt as text instead
of tokens, and applies its own template, tokenizer and context check; the pipeline waits for
its first event so that a refusal (the upstream is down, or rejects the request) is still an
`LmxError` raised by `start()`.

A front end builds a `GenerateRequest` from its dialect, calls `GenerationService.start()`
(every error it raises is an `LmxError`, before anything is streamed), then reads
`Run.events()` or awaits `Run.result()`, translating events into its own wire format. It holds
no lease, validation, template or recording logic of its own.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, fields, replace
from typing import Any

from server.catalog import Catalog
from server.engines.base import (
    Engine,
    Finished,
    Generation,
    GenerationRequest,
    SamplingParams,
    TextPrompt,
    TokenText,
)
from server.errors import (
    ChatTemplateBroken,
    ContextOverflow,
    EngineFailure,
    InvalidRequest,
    LmxError,
    RateLimited,
)
from server.grammar import json_grammar
from server.keys import ApiKey, Permit, current_key
from server.scheduler import Lease, Scheduler
from server.settings import PresetConfig
from server.telemetry import RequestLog, RequestRecord

# Bounds every front end gets (the OpenAPI schema of /v1 and /api states the same ones).
SAMPLING_BOUNDS: dict[str, tuple[float | None, float | None, bool]] = {
    # name: (low, high, low is exclusive)
    "temperature": (0.0, 2.0, False),
    "top_p": (0.0, 1.0, False),
    "top_k": (0, None, False),
    "min_p": (0.0, 1.0, False),
    "repeat_penalty": (0.0, 10.0, True),
    "presence_penalty": (-2.0, 2.0, False),
    "frequency_penalty": (-2.0, 2.0, False),
}
MAX_STOP = 16
MAX_CHOICES = 16


@dataclass(frozen=True)
class Sampling:
    """Sampling fields a request set (None: not set, the preset's or llama.cpp's default)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None

    def params(self, index: int = 0) -> SamplingParams:
        seed = self.seed
        if seed is not None and index:
            seed += index  # n choices with one seed must still differ, reproducibly
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["seed"] = seed
        return SamplingParams.merged(**values)

    def given(self, index: int = 0) -> dict[str, Any]:
        """Only the fields that were set (as `params` seeds them), for an engine that passes
        them on and lets its upstream's defaults stand for the rest."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.seed is not None:
            values["seed"] = self.params(index).seed
        return {k: v for k, v in values.items() if v is not None}


@dataclass
class GenerateRequest:
    """What a front end asks for, in no dialect. Exactly one of `messages` or `prompts`."""

    model: str
    messages: list[dict[str, Any]] | None = None  # role, content (text), name
    prompts: list[str] | None = None  # text completion: one choice (x n) per prompt
    raw: bool = False  # prompts may contain special tokens (Ollama's raw mode)
    max_tokens: int | None = None
    sampling: Sampling = field(default_factory=Sampling)
    stop: list[str] = field(default_factory=list)
    n: int = 1
    json_schema: dict[str, Any] | None = None
    json_mode: bool = False  # any JSON object (json_schema None) or one matching json_schema
    logit_bias: dict[int, float] = field(default_factory=dict)
    ignore_eos: bool = False
    keep_alive: float | None = None
    label: str = "api"  # who asked: openai, ollama, tui, cli ... (request log, metrics)
    path: str = ""  # the route, for the request log
    param_prefix: str = ""  # how the dialect names sampling fields in errors ("options.")
    # The API key that asked (its limits apply, its name is recorded); the HTTP guard sets it
    # for the request being served, so no adapter has to pass it along.
    key: ApiKey | None = field(default_factory=current_key.get)


@dataclass(frozen=True)
class Delta:
    """Generated text for choice `index`."""

    index: int
    text: str


@dataclass(frozen=True)
class Done:
    """Choice `index` ended; `finished` holds its reason, usage and timings."""

    index: int
    finished: Finished


RunEvent = Delta | Done


@dataclass
class RunResult:
    """A whole run, for non-streaming responses."""

    texts: list[str]
    finished: list[Finished]


@dataclass(frozen=True)
class Usage:
    """Token counts: each distinct prompt counted once, as OpenAI does for n > 1."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Run:
    """One submitted request: its events, its lease, its record. Use `events()` or `result()`,
    and `aclose()` if neither ran to the end (both close it themselves when they do)."""

    def __init__(
        self,
        service: GenerationService,
        lease: Lease,
        request: GenerateRequest,
        prompts: list[list[int]],
        requests: list[GenerationRequest],
        started: float,
        permit: Permit | None = None,
    ) -> None:
        self.service = service
        self.permit = permit
        self.lease = lease
        self.request = request
        self.model_id = lease.model.info.id
        self.load_seconds = lease.load_seconds
        self.prompts = prompts
        self.choices = len(requests)
        self.started = started
        self.finished: list[Finished | None] = [None] * len(requests)
        self._queue: asyncio.Queue[tuple[int, TokenText | Finished]] = asyncio.Queue()
        self._early: deque[tuple[int, TokenText | Finished]] = deque()  # read by opened()
        self._gens: list[Generation] = []
        self._closed = False
        loop = asyncio.get_running_loop()
        try:
            for i, r in enumerate(requests):
                self._gens.append(lease.engine.submit(r, self._sink(loop, i)))
        except BaseException:
            for g in self._gens:
                g.cancel()
            lease.release()
            if permit is not None:
                permit.release()
            raise

    def _sink(self, loop: asyncio.AbstractEventLoop, i: int) -> Any:
        def sink(ev: TokenText | Finished) -> None:
            loop.call_soon_threadsafe(self._queue.put_nowait, (i, ev))

        return sink

    @property
    def done(self) -> bool:
        return all(f is not None for f in self.finished)

    async def opened(self) -> None:
        """Wait for every choice's first event. A choice that failed before any text (an
        upstream that is down or refused the request) raises its error, and the run ends
        unrecorded: the front end answers (and records) that error in its own dialect."""
        try:
            firsts: set[int] = set()
            while len(firsts) < self.choices:
                i, ev = await self._queue.get()
                self._early.append((i, ev))
                if i in firsts:
                    continue
                firsts.add(i)
                if isinstance(ev, Finished) and ev.reason == "error":
                    raise ev.failure or EngineFailure(ev.error or "generation failed")
        except BaseException:
            self._closed = True
            for g in self._gens:
                g.cancel()
            self.lease.release()
            raise

    async def events(self) -> AsyncIterator[RunEvent]:
        """Text as it is generated and one `Done` per choice; closes the run at the end."""
        try:
            while not self.done:
                i, ev = self._early.popleft() if self._early else await self._queue.get()
                if isinstance(ev, TokenText):
                    yield Delta(i, ev.text)
                else:
                    if ev.reason == "cancelled" and not self._closed:
                        # Nobody here cancelled it: the model was unloaded or lmx is stopping.
                        # The client gets an error in its dialect, not a quiet end.
                        why = self.service.scheduler.why_stopped(self.model_id)
                        ev = replace(ev, reason="error", error=why)
                    self.finished[i] = ev
                    yield Done(i, ev)
        finally:
            await self.aclose()

    async def result(self) -> RunResult:
        texts = [""] * self.choices
        parts: list[list[str]] = [[] for _ in range(self.choices)]
        async for ev in self.events():
            if isinstance(ev, Delta):
                parts[ev.index].append(ev.text)
        for i in range(self.choices):
            texts[i] = "".join(parts[i])
        return RunResult(texts, [f for f in self.finished if f is not None])

    def usage(self) -> Usage:
        done = [f for f in self.finished if f is not None]
        per_prompt = max(1, self.request.n)
        firsts = [f for k, f in enumerate(self.finished) if k % per_prompt == 0 and f is not None]
        return Usage(
            prompt_tokens=sum(f.prompt_tokens for f in firsts),
            completion_tokens=sum(f.completion_tokens for f in done),
            cached_tokens=sum(f.cached_tokens for f in firsts),
        )

    @property
    def error(self) -> str | None:
        for f in self.finished:
            if f is not None and f.reason == "error":
                return f.error or "generation failed"
        return None

    async def aclose(self) -> None:
        """Cancel what still runs, release the model, record the request (once)."""
        if self._closed:
            return
        self._closed = True
        for g in self._gens:
            g.cancel()
        self.lease.release()
        if self.permit is not None:
            self.permit.release()
        status = 200 if self.done else 499  # the client went away first
        if self.error is not None:
            status = 503
        self.service.record(self, status)


class GenerationService:
    """Runs requests for every front end over the catalog and the scheduler."""

    def __init__(self, catalog: Catalog, scheduler: Scheduler, requests: RequestLog) -> None:
        self.catalog = catalog
        self.scheduler = scheduler
        self.requests = requests

    async def start(self, req: GenerateRequest) -> Run:
        """Resolve, validate, lease, render and submit; every failure is an LmxError."""
        started = time.perf_counter()
        target = self.catalog.target(req.model)
        req = apply_preset(req, target.preset)
        validate(req)
        req = apply_key_cap(req)
        grammar = constraint_grammar(req)
        permit = req.key.enter() if req.key is not None else None
        try:
            lease = await asyncio.to_thread(self.scheduler.lease, target.info, req.keep_alive)
        except BaseException:
            if permit is not None:
                permit.release()
            raise
        try:
            if lease.engine.takes_text:
                prompts: list[list[int]] = []
                gen_requests = text_requests(req)
            else:
                try:
                    prompts = await asyncio.to_thread(render, lease.engine, req)
                except ChatTemplateBroken as e:
                    self.catalog.mark_broken(target.info.id, e.message)
                    raise
                gen_requests = build_requests(lease.engine, req, prompts, grammar)
        except BaseException:
            lease.release(req.keep_alive)
            if permit is not None:
                permit.release()
            raise
        run = Run(self, lease, req, prompts, gen_requests, started, permit)
        if lease.engine.takes_text:
            await run.opened()
        return run

    async def load(self, model: str, keep_alive: float | None = None) -> Lease:
        """Load (or keep loaded) without generating: Ollama's empty prompt, the TUI's `l`.
        The caller releases the lease."""
        info = self.catalog.target(model).info
        return await asyncio.to_thread(self.scheduler.lease, info, keep_alive)

    async def embed(
        self,
        model: str,
        texts: list[str],
        *,
        keep_alive: float | None = None,
        label: str = "api",
        path: str = "",
    ) -> tuple[str, list[list[float]], int]:
        """Vectors for `texts`: (model id, vectors, tokens read)."""
        started = time.perf_counter()
        if not texts:
            raise InvalidRequest("input is empty", param="input")
        info = self.catalog.target(model).info
        key = current_key.get()
        permit = key.enter() if key is not None else None
        try:
            lease = await asyncio.to_thread(self.scheduler.lease, info, keep_alive)
        except BaseException:
            if permit is not None:
                permit.release()
            raise
        status, n = 500, 0
        try:
            vectors, n = await asyncio.to_thread(lease.engine.embed, texts)
            status = 200
        except LmxError as e:
            status = e.status
            raise
        finally:
            lease.release()
            if permit is not None:
                permit.release()
            self.requests.record(
                RequestRecord(
                    at=time.time(),
                    method="POST",
                    path=path,
                    model=info.id,
                    status=status,
                    prompt_tokens=n,
                    latency_ms=(time.perf_counter() - started) * 1000,
                    source=label,
                    key=key.name if key is not None else None,
                )
            )
        return info.id, vectors, n

    def record(self, run: Run, status: int) -> None:
        done = [f for f in run.finished if f is not None]
        ttfts = [f.timings.ttft_ms for f in done if f.timings]
        u = run.usage()
        self.requests.record(
            RequestRecord(
                at=time.time(),
                method="POST",
                path=run.request.path,
                model=run.model_id,
                status=status,
                prompt_tokens=u.prompt_tokens,
                completion_tokens=u.completion_tokens,
                cached_tokens=u.cached_tokens,
                latency_ms=(time.perf_counter() - run.started) * 1000,
                ttft_ms=min(ttfts) if ttfts else None,
                source=run.request.label,
                key=run.request.key.name if run.request.key is not None else None,
            )
        )


# ----- the steps ------------------------------------------------------------------------------

PRESET_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty")


def apply_preset(req: GenerateRequest, preset: PresetConfig | None) -> GenerateRequest:
    """A preset's defaults where the request is silent, and its system prompt when the
    conversation has none."""
    if preset is None:
        return req
    sampling = replace(
        req.sampling,
        **{
            k: getattr(preset, k)
            for k in PRESET_SAMPLING
            if getattr(req.sampling, k) is None and getattr(preset, k) is not None
        },
    )
    changes: dict[str, Any] = {"sampling": sampling}
    if req.max_tokens is None and preset.max_tokens is not None:
        changes["max_tokens"] = preset.max_tokens
    if not req.stop and preset.stop:
        changes["stop"] = list(preset.stop)
    msgs = req.messages
    if preset.system and msgs is not None and not any(m.get("role") == "system" for m in msgs):
        changes["messages"] = [{"role": "system", "content": preset.system}, *msgs]
    return replace(req, **changes)


def validate(req: GenerateRequest) -> None:
    """Parameter bounds, the same for every front end; InvalidRequest names the field."""
    pre = req.param_prefix
    for name, (low, high, exclusive) in SAMPLING_BOUNDS.items():
        v = getattr(req.sampling, name)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise InvalidRequest(f"{pre}{name} must be a number.", param=pre + name)
        below = low is not None and (v <= low if exclusive else v < low)
        if below or (high is not None and v > high):
            lo = "" if low is None else (f"> {low}" if exclusive else f">= {low}")
            hi = "" if high is None else f"<= {high}"
            rule = " and ".join(x for x in (lo, hi) if x)
            raise InvalidRequest(f"{pre}{name} must be {rule}; got {v}.", param=pre + name)
    if req.max_tokens is not None and req.max_tokens < 1:
        raise InvalidRequest(
            f"max_tokens must be at least 1; got {req.max_tokens}.", param="max_tokens"
        )
    if not 1 <= req.n <= MAX_CHOICES:
        raise InvalidRequest(f"n must be between 1 and {MAX_CHOICES}.", param="n")
    if len(req.stop) > MAX_STOP:
        raise InvalidRequest(f"stop takes at most {MAX_STOP} strings.", param=pre + "stop")
    if (req.messages is None) == (req.prompts is None):
        raise InvalidRequest("a request needs messages or a prompt.", param="messages")
    if req.prompts is not None and not req.prompts:
        raise InvalidRequest("prompt is empty.", param="prompt")


def apply_key_cap(req: GenerateRequest) -> GenerateRequest:
    """The key's max_tokens cap: a request that leaves max_tokens unset gets the cap; one that
    asks for more is refused (429, as the key's other limit is)."""
    cap = req.key.max_tokens if req.key is not None else None
    if not cap:
        return req
    if req.max_tokens is None:
        return replace(req, max_tokens=cap)
    if req.max_tokens > cap:
        assert req.key is not None
        raise RateLimited(
            f"The key '{req.key.name}' may generate at most {cap} tokens per request; this "
            f"one asks for {req.max_tokens}. Lower max_tokens.",
            param="max_tokens",
        )
    return req


def constraint_grammar(req: GenerateRequest) -> str | None:
    """The GBNF that enforces the requested output format (checked before anything loads)."""
    if not req.json_mode:
        return None
    return json_grammar(req.json_schema)


def render(engine: Engine, req: GenerateRequest) -> list[list[int]]:
    """The prompt tokens: the chat template over the messages, or each raw prompt."""
    if req.messages is not None:
        return [engine.format_chat(req.messages)]
    assert req.prompts is not None
    out = [engine.tokenize(p, add_special=True, special=req.raw) for p in req.prompts]
    if any(not p for p in out):
        raise InvalidRequest("prompt is empty.", param="prompt")
    return out


def text_requests(req: GenerateRequest) -> list[GenerationRequest]:
    """One request per prompt and choice, as text, for an engine that takes text: the upstream
    applies its own template, tokenizer, context check and format constraint."""
    texts = [None] if req.prompts is None else list(req.prompts)
    if any(t == "" for t in texts):
        raise InvalidRequest("prompt is empty.", param="prompt")
    out = []
    for prompt in texts:
        for i in range(req.n):
            out.append(
                GenerationRequest(
                    prompt_tokens=[],
                    max_tokens=req.max_tokens or 0,
                    sampling=req.sampling.params(i),
                    stop=[s for s in req.stop if s],
                    logit_bias=dict(req.logit_bias),
                    ignore_eos=req.ignore_eos,
                    label=req.label,
                    text=TextPrompt(
                        messages=req.messages,
                        prompt=prompt,
                        raw=req.raw,
                        sampling=req.sampling.given(i),
                        json_mode=req.json_mode,
                        json_schema=req.json_schema,
                    ),
                )
            )
    return out


def build_requests(
    engine: Engine, req: GenerateRequest, prompts: list[list[int]], grammar: str | None
) -> list[GenerationRequest]:
    """One engine request per prompt and choice; a prompt that leaves no room is refused."""
    limit = engine.context_length
    out = []
    for prompt in prompts:
        if len(prompt) >= limit:
            raise ContextOverflow(len(prompt), limit)
        room = limit - len(prompt)
        for i in range(req.n):
            out.append(
                GenerationRequest(
                    prompt_tokens=prompt,
                    max_tokens=min(req.max_tokens or room, room),
                    sampling=req.sampling.params(i),
                    stop=[s for s in req.stop if s],
                    grammar=grammar,
                    logit_bias=dict(req.logit_bias),
                    ignore_eos=req.ignore_eos,
                    label=req.label,
                )
            )
    return out
