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

Chat replies are parsed here, one parser per choice (`server.chat_output`): thinking is split
out of the answer (`Reasoning`) and tool calls come as `CallStart` / `CallDelta` / `CallEnd`,
so every dialect reads the same events and only spells them its own way.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any, TypeVar

from server.catalog import Catalog
from server.chat_output import (
    ChatOutput,
    ChatOutputParser,
    ContentDelta,
    OutputEvent,
    ReasoningDelta,
    ToolCall,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
)
from server.engines.base import (
    CallPiece,
    Engine,
    Event,
    Finished,
    Generation,
    GenerationRequest,
    SamplingParams,
    TextPrompt,
    ThinkingText,
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
from server.grammar import ReplyMismatch, SchemaCheck, check_grammar, json_constraint
from server.keys import ApiKey, Permit, current_key
from server.reasoning import (
    THINK_END,
    THINK_START,
    ThinkSplitter,
    prompt_opens_thinking,
    template_thinks,
)
from server.scheduler import Lease, Scheduler
from server.settings import PresetConfig
from server.telemetry import RequestDetail, RequestLog, RequestRecord
from server.toolcall_parsers import new_call_id
from server.toolcalls import (
    AUTO,
    NONE,
    ToolCallPlan,
    ToolChoice,
    ToolSpec,
    messages_for_openai,
    plan_tool_calls,
)

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
# What a finished request's detail view keeps (bounded: the log holds DETAIL_RECORDS of them).
DETAIL_CHARS = 16_000  # of the reply
DETAIL_MESSAGE_CHARS = 4_000  # of each message
DETAIL_MESSAGES = 32  # the last ones
_RUN_IDS = itertools.count(1)

T = TypeVar("T")


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
    """What a front end asks for, in no dialect. Exactly one of `messages` or `prompts`.

    Messages are OpenAI-shaped dicts: `role`, `content` (text), `name`; an assistant's
    `tool_calls` (`[{"id", "function": {"name", "arguments"}}]`, arguments as JSON text or an
    object); a `role: tool` result's `tool_call_id` (and `name`).
    """

    model: str
    messages: list[dict[str, Any]] | None = None
    prompts: list[str] | None = None  # text completion: one choice (x n) per prompt
    raw: bool = False  # prompts may contain special tokens (Ollama's raw mode)
    max_tokens: int | None = None
    sampling: Sampling = field(default_factory=Sampling)
    stop: list[str] = field(default_factory=list)
    n: int = 1
    json_schema: dict[str, Any] | None = None
    json_mode: bool = False  # any JSON object (json_schema None) or one matching json_schema
    grammar: str | None = None  # a GBNF the reply must follow (llama.cpp's `grammar` field)
    logit_bias: dict[int, float] = field(default_factory=dict)
    ignore_eos: bool = False
    keep_alive: float | None = None
    tools: list[ToolSpec] = field(default_factory=list)
    tool_choice: ToolChoice | None = None  # None: auto when there are tools, else none
    parallel_tool_calls: bool = True
    # Ask the template to think (True), not to (False), or leave it to the template (None).
    think: bool | None = None
    label: str = "api"  # who asked: openai, ollama, tui, cli ... (request log, metrics)
    affinity: str | None = None  # the conversation it belongs to (GenerationRequest.affinity)
    path: str = ""  # the route, for the request log
    param_prefix: str = ""  # how the dialect names sampling fields in errors ("options.")
    # The API key that asked (its limits apply, its name is recorded); the HTTP guard sets it
    # for the request being served, so no adapter has to pass it along.
    key: ApiKey | None = field(default_factory=current_key.get)

    @property
    def choice(self) -> ToolChoice:
        """The tool choice in force."""
        if self.tool_choice is not None:
            return self.tool_choice
        return AUTO if self.tools else NONE


@dataclass(frozen=True)
class Delta:
    """Answer text for choice `index` (all of the text, when nothing is parsed out of it)."""

    index: int
    text: str


@dataclass(frozen=True)
class Reasoning:
    """Thinking text for choice `index`, split out of the answer."""

    index: int
    text: str


@dataclass(frozen=True)
class CallStart:
    """Choice `index` began tool call number `call`: its id and the function's name."""

    index: int
    call: int
    id: str
    name: str


@dataclass(frozen=True)
class CallDelta:
    """A fragment of a call's arguments (the fragments join to its JSON text)."""

    index: int
    call: int
    arguments: str


@dataclass(frozen=True)
class CallEnd:
    """A call ended. `complete` False: the reply stopped before the call closed (`raw` is the
    model's text of it, which `result()` gives back as content)."""

    index: int
    call: int
    id: str
    name: str
    arguments: str
    complete: bool = True
    raw: str = ""


@dataclass(frozen=True)
class Done:
    """Choice `index` ended; `finished` holds the engine's reason, usage and timings, and
    `tool_calls` how many complete calls the choice made."""

    index: int
    finished: Finished
    tool_calls: int = 0

    @property
    def reason(self) -> str:
        """The finish reason to report: `tool_calls` when calls ended the reply."""
        if self.tool_calls and self.finished.reason == "stop":
            return "tool_calls"
        return self.finished.reason


RunEvent = Delta | Reasoning | CallStart | CallDelta | CallEnd | Done


@dataclass(frozen=True)
class RunStatus:
    """One request in flight at one instant (the Requests tab, GET /admin/requests)."""

    id: str
    model: str
    source: str
    path: str
    started: float  # wall clock
    age_s: float
    phase: str  # queued, prefill or decode (the most advanced of its choices)
    slots: tuple[int, ...]
    prompt_tokens: int
    prompt_done: int
    generated: int
    cached: int
    tokens_per_s: float

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["slots"] = list(self.slots)
        out["age_s"] = round(self.age_s, 3)
        out["tokens_per_s"] = round(self.tokens_per_s, 2)
        return out


@dataclass
class RunResult:
    """A whole run, for non-streaming responses: per choice its answer text (`texts`), its
    parsed reply (`outputs`: content, reasoning, tool calls) and how it ended."""

    texts: list[str]
    finished: list[Finished]
    outputs: list[ChatOutput] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Usage:
    """Token counts: each distinct prompt counted once, as OpenAI does for n > 1."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Prompt:
    """A request made ready for its engine: the prompt tokens, the grammar, and how to read
    the reply (tool-call plan, reasoning split)."""

    tokens: list[list[int]]
    grammar: str | None = None
    plan: ToolCallPlan | None = None
    grammar_param: str = "grammar"  # the request field the grammar came from
    content_check: SchemaCheck | None = None  # the reply's text, validated when it ends
    split_reasoning: bool = False
    starts_thinking: bool = False  # the template opened a thinking block for the reply
    # Control tokens the engine must give as text: the markers the parsers read.
    preserved_tokens: frozenset[int] = frozenset()
    text: str | None = None  # the rendered chat prompt, when asked for

    def parser(self) -> ChatOutputParser | None:
        """A fresh parser for one reply (None: the text is all answer)."""
        tools = self.plan.new_parser() if self.plan is not None else None
        reasoning = (
            ThinkSplitter(starts_inside=self.starts_thinking) if self.split_reasoning else None
        )
        if tools is None and reasoning is None:
            return None
        return ChatOutputParser(reasoning=reasoning, tools=tools)


class EngineCalls:
    """Tool calls an engine parsed itself (an upstream server's `tool_calls`), as the events
    the text parsers give: a call starts once its name is known, its argument fragments
    follow, and it ends when the next call begins or the reply ends (complete when its
    arguments are a JSON object). Calls are told apart by the engine's index or, where a
    server leaves the index out and sends each call whole, by a new id."""

    def __init__(self) -> None:
        self._open: _Call | None = None
        self._key = 0  # the engine's index of the open call
        self._ended: set[int] = set()
        self._count = 0

    def feed(self, piece: CallPiece) -> list[OutputEvent]:
        out: list[OutputEvent] = []
        call = self._open
        other_id = call is not None and bool(piece.id and call.id and piece.id != call.id)
        if call is None or piece.index != self._key or other_id:
            if piece.index in self._ended and not (piece.id or piece.name):
                return out  # a late fragment of a call that has ended: nothing to add it to
            if call is not None:
                self._ended.add(self._key)
                out += self._end(call, "stop")  # the reply went on: this call is whole
            call = self._open = _Call(self._count)
            self._key = piece.index
            self._count += 1
        if piece.id and not call.id:
            call.id = piece.id
        if piece.name and not call.name:
            call.name = piece.name
        call.arguments.append(piece.arguments)
        if not call.started and call.name:
            call.started = True
            call.id = call.id or new_call_id()
            out.append(ToolCallStart(call.index, call.id, call.name))
            piece = replace(piece, arguments="".join(call.arguments))
        if call.started and piece.arguments:
            out.append(ToolCallDelta(call.index, piece.arguments))
        return out

    def finish(self, reason: str) -> list[OutputEvent]:
        """End the open call, as the reply ended for `reason`."""
        call, self._open = self._open, None
        return [] if call is None else self._end(call, reason)

    @staticmethod
    def _end(call: _Call, reason: str) -> list[OutputEvent]:
        """A call with no arguments is one that takes none, unless the limit cut the reply
        before they came; one that never got a name is given back as text."""
        args = "".join(call.arguments)
        if not call.started:
            return [ContentDelta(args)] if args else []
        complete = _is_object(args) if args or reason != "stop" else True
        raw = "" if complete else args
        return [ToolCallEnd(call.index, call.id, call.name, args or "{}", complete, raw)]


@dataclass
class _Call:
    index: int
    id: str = ""
    name: str = ""
    started: bool = False
    arguments: list[str] = field(default_factory=list)


def _is_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except (ValueError, RecursionError):
        return False


class Run:
    """One submitted request: its events, its lease, its record. Use `events()` or `result()`,
    and `aclose()` if neither ran to the end (both close it themselves when they do)."""

    def __init__(
        self,
        service: GenerationService,
        lease: Lease,
        request: GenerateRequest,
        prompt: Prompt,
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
        self.prompt = prompt
        self.prompts = prompt.tokens
        self.choices = len(requests)
        self.started = started
        self.id = f"req-{next(_RUN_IDS)}"
        self.started_at = time.time()
        self.finished: list[Finished | None] = [None] * len(requests)
        self.texts: list[list[str]] = [[] for _ in requests]  # for the detail view (bounded)
        self._kept = 0
        self._parsers = [prompt.parser() for _ in requests]
        self._calls = [0] * len(requests)
        self._engine_calls = [EngineCalls() for _ in requests]
        # What the grammar held only in part is checked on the finished reply.
        self._content_check = prompt.content_check
        self._call_checks = prompt.plan.checks if prompt.plan is not None else {}
        self._content: list[list[str]] = [[] for _ in requests]
        self._mismatch: list[str | None] = [None] * len(requests)
        self._queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self._early: deque[tuple[int, Event]] = deque()  # read by opened()
        self._gens: list[Generation] = []
        self._closed = False
        self._cancelled = False  # by the operator (cancel()), not by an unload
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
        def sink(ev: Event) -> None:
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
            if self.permit is not None:
                self.permit.release()
            self.service._forget(self)
            raise

    @property
    def prompt_tokens(self) -> int:
        """The first prompt's length (known before anything is generated)."""
        return len(self.prompts[0]) if self.prompts else 0

    def _translate(self, i: int, events: list[OutputEvent]) -> list[RunEvent]:
        out: list[RunEvent] = []
        for e in events:
            if isinstance(e, ContentDelta):
                out.append(Delta(i, e.text))
            elif isinstance(e, ReasoningDelta):
                out.append(Reasoning(i, e.text))
            elif isinstance(e, ToolCallStart):
                out.append(CallStart(i, e.index, e.id, e.name))
            elif isinstance(e, ToolCallDelta):
                out.append(CallDelta(i, e.index, e.arguments))
            elif isinstance(e, ToolCallEnd):
                self._calls[i] += e.complete
                check = self._call_checks.get(e.name)
                if check is not None and e.complete and self._mismatch[i] is None:
                    self._mismatch[i] = check.text_problem(e.arguments)
                out.append(CallEnd(i, e.index, e.id, e.name, e.arguments, e.complete, e.raw))
        return out

    async def events(self) -> AsyncIterator[RunEvent]:
        """Parsed output as it is generated and one `Done` per choice; closes the run at the
        end."""
        try:
            while not self.done:
                i, ev = self._early.popleft() if self._early else await self._queue.get()
                parser = self._parsers[i]
                if isinstance(ev, TokenText):
                    if self._kept < DETAIL_CHARS:  # the model's text, for the detail view
                        self.texts[i].append(ev.text)
                        self._kept += len(ev.text)
                    if parser is None:
                        if self._content_check is not None:
                            self._content[i].append(ev.text)
                        yield Delta(i, ev.text)
                        continue
                    for out in self._translate(i, parser.feed(ev.text)):
                        if self._content_check is not None and isinstance(out, Delta):
                            self._content[i].append(out.text)
                        yield out
                elif isinstance(ev, ThinkingText):
                    yield Reasoning(i, ev.text)
                elif isinstance(ev, CallPiece):
                    for out in self._translate(i, self._engine_calls[i].feed(ev)):
                        yield out
                else:
                    if ev.reason == "cancelled" and not (self._closed or self._cancelled):
                        # Nobody here cancelled it: the model was unloaded or lmx is stopping.
                        # The client gets an error in its dialect, not a quiet end.
                        why = self.service.scheduler.why_stopped(self.model_id)
                        ev = replace(ev, reason="error", error=why)
                    if parser is not None:
                        for out in self._translate(i, parser.finish()):
                            yield out
                    for out in self._translate(i, self._engine_calls[i].finish(ev.reason)):
                        yield out
                    ev = self._checked(i, ev)
                    self.finished[i] = ev
                    yield Done(i, ev, self._calls[i])
        finally:
            await self.aclose()

    def _checked(self, i: int, ev: Finished) -> Finished:
        """`ev`, or an error when the reply does not match a schema the grammar held only in
        part (a reply cut short by max_tokens says so by its finish reason instead)."""
        if ev.reason != "stop":
            return ev
        problem = self._mismatch[i]
        param = "tools"
        if problem is None and self._content_check is not None:
            problem = self._content_check.text_problem("".join(self._content[i]))
            param = self._content_check.param
        if problem is None:
            return ev
        return replace(
            ev, reason="error", error=problem, failure=ReplyMismatch(problem, param=param)
        )

    async def result(self) -> RunResult:
        """Every choice whole: answer, reasoning, complete tool calls, finish reason."""
        content: list[list[str]] = [[] for _ in range(self.choices)]
        reasoning: list[list[str]] = [[] for _ in range(self.choices)]
        calls: list[list[ToolCall]] = [[] for _ in range(self.choices)]
        reasons = [""] * self.choices
        async for ev in self.events():
            if isinstance(ev, Delta):
                content[ev.index].append(ev.text)
            elif isinstance(ev, Reasoning):
                reasoning[ev.index].append(ev.text)
            elif isinstance(ev, CallEnd):
                if ev.complete:
                    calls[ev.index].append(ToolCall(ev.id, ev.name, ev.arguments))
                else:
                    content[ev.index].append(ev.raw)
            elif isinstance(ev, Done):
                reasons[ev.index] = ev.reason
        outputs = [
            ChatOutput("".join(content[i]), "".join(reasoning[i]), calls[i])
            for i in range(self.choices)
        ]
        return RunResult(
            [o.content for o in outputs],
            [f for f in self.finished if f is not None],
            outputs,
            reasons,
        )

    def usage(self) -> Usage:
        done = [f for f in self.finished if f is not None]
        per_prompt = max(1, self.request.n)
        firsts = [f for k, f in enumerate(self.finished) if k % per_prompt == 0 and f is not None]
        return Usage(
            prompt_tokens=sum(f.prompt_tokens for f in firsts),
            completion_tokens=sum(f.completion_tokens for f in done),
            cached_tokens=sum(f.cached_tokens for f in firsts),
        )

    def status(self) -> RunStatus:
        """Where this request is now, from the engine's live counters."""
        now = time.perf_counter()
        progs = [(g.progress, len(g.request.prompt_tokens)) for g in self._gens]
        order = {"queued": 0, "prefill": 1, "decode": 2}
        phase = max((p.phase(n) for p, n in progs), key=order.__getitem__, default="queued")
        generated = sum(p.generated for p, _ in progs)
        firsts = [p.first_token_at for p, _ in progs if p.first_token_at is not None]
        span = now - min(firsts) if firsts else 0.0
        return RunStatus(
            id=self.id,
            model=self.model_id,
            source=self.request.label,
            path=self.request.path,
            started=self.started_at,
            age_s=now - self.started,
            phase=phase,
            slots=tuple(p.slot for p, _ in progs if p.slot is not None),
            prompt_tokens=sum(n for _, n in progs),  # over its choices, as prompt_done
            prompt_done=sum(p.prompt_done for p, _ in progs),
            generated=generated,
            cached=sum(p.cached for p, _ in progs),
            tokens_per_s=generated / span if span > 0.05 else 0.0,
        )

    def cancel(self) -> None:
        """Stop generating (the operator's cancel): each choice ends with reason `cancelled`
        and the client gets the end of its response."""
        self._cancelled = True
        for g in self._gens:
            g.cancel()

    @property
    def failure(self) -> LmxError | None:
        """The first failed choice's error, typed (None: none failed)."""
        for f in self.finished:
            if f is not None and f.reason == "error":
                return f.failure or EngineFailure(f.error or "generation failed")
        return None

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
        self.service._forget(self)
        status = 200 if self.done else 499  # the client went away first
        if (failure := self.failure) is not None:
            status = failure.status
        self.service.record(self, status)


class GenerationService:
    """Runs requests for every front end over the catalog and the scheduler."""

    def __init__(self, catalog: Catalog, scheduler: Scheduler, requests: RequestLog) -> None:
        self.catalog = catalog
        self.scheduler = scheduler
        self.requests = requests
        self._active: dict[str, Run] = {}
        self._lock = threading.Lock()

    def in_flight(self) -> list[RunStatus]:
        """Every request being generated now, oldest first (any thread)."""
        with self._lock:
            runs = list(self._active.values())
        return [r.status() for r in runs]

    def cancel(self, request_id: str) -> bool:
        """Cancel a request in flight (the app's key, POST /admin/requests/{id}/cancel).
        False when no such request is running."""
        with self._lock:
            run = self._active.get(request_id)
        if run is None:
            return False
        run.cancel()
        return True

    def _track(self, run: Run) -> Run:
        with self._lock:
            self._active[run.id] = run
        return run

    def _forget(self, run: Run) -> None:
        with self._lock:
            self._active.pop(run.id, None)

    async def start(self, req: GenerateRequest) -> Run:
        """Resolve, validate, lease, render and submit; every failure is an LmxError."""
        started = time.perf_counter()
        target = self.catalog.target(req.model)
        req = apply_preset(req, target.preset)
        validate(req)
        req = apply_key_cap(req)
        constraint = await asyncio.to_thread(constraint_grammar, req)
        split = self.reasoning_for(target.info.id)
        permit = req.key.enter() if req.key is not None else None
        try:
            lease = await asyncio.to_thread(self.scheduler.lease, target.info, req.keep_alive)
        except BaseException:
            if permit is not None:
                permit.release()
            raise
        try:
            if lease.engine.takes_text:
                prompt = Prompt([])
                gen_requests = text_requests(req)
            else:
                try:
                    prompt = await asyncio.to_thread(
                        render, lease.engine, req, constraint=constraint, split_reasoning=split
                    )
                except ChatTemplateBroken as e:
                    self.catalog.mark_broken(target.info.id, e.message)
                    raise
                gen_requests = build_requests(lease.engine, req, prompt)
        except BaseException:
            lease.release(req.keep_alive)
            if permit is not None:
                permit.release()
            raise
        run = self._track(Run(self, lease, req, prompt, gen_requests, started, permit))
        if lease.engine.takes_text:
            await run.opened()
        return run

    def reasoning_for(self, model_id: str) -> bool:
        """Whether thinking is split out of this model's replies (the `reasoning` setting)."""
        return bool(self.scheduler.settings.for_model("reasoning", model_id))

    async def preview(self, req: GenerateRequest) -> tuple[str, Prompt]:
        """The prompt a request would get (text and tokens), without generating: token counts,
        `/apply-template`. Returns the model id and the prompt."""
        target = self.catalog.target(req.model)
        req = apply_preset(req, target.preset)
        validate(req)
        constraint = await asyncio.to_thread(constraint_grammar, req)
        split = self.reasoning_for(target.info.id)

        def run(engine: Engine) -> Prompt:
            return render(engine, req, constraint=constraint, split_reasoning=split, want_text=True)

        return await self.on_model(req.model, run, keep_alive=req.keep_alive)

    async def on_model(
        self, model: str, work: Callable[[Engine], T], *, keep_alive: float | None = None
    ) -> tuple[str, T]:
        """Run `work(engine)` in a worker thread on the model (loaded on demand, leased while it
        runs): tokenizing, rendering. Returns the model id and what `work` returned."""
        info = self.catalog.target(model).info
        lease = await asyncio.to_thread(self.scheduler.lease, info, keep_alive)
        try:
            return info.id, await asyncio.to_thread(work, lease.engine)
        finally:
            lease.release()

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
        if not texts:
            raise InvalidRequest("input is empty", param="input")
        model_id, (vectors, n) = await self._counted(
            model, lambda engine: engine.embed(texts), keep_alive, label, path
        )
        return model_id, vectors, n

    async def rerank(
        self,
        model: str,
        query: str,
        documents: list[str],
        *,
        instruction: str | None = None,
        keep_alive: float | None = None,
        label: str = "api",
        path: str = "",
    ) -> tuple[str, list[float], int]:
        """A relevance score per document: (model id, scores in documents' order, tokens)."""
        if not documents:
            raise InvalidRequest("documents is empty", param="documents")
        model_id, (scores, n) = await self._counted(
            model,
            lambda engine: engine.rerank(query, documents, instruction),
            keep_alive,
            label,
            path,
        )
        return model_id, scores, n

    async def _counted(
        self,
        model: str,
        work: Callable[[Engine], tuple[T, int]],
        keep_alive: float | None,
        label: str,
        path: str,
    ) -> tuple[str, tuple[T, int]]:
        """`work(engine)` (which returns its result and the tokens it read) on the model, in a
        worker thread, under the key's concurrency permit, recorded as a request."""
        started = time.perf_counter()
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
            result, n = await asyncio.to_thread(work, lease.engine)
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
        return info.id, (result, n)

    def record(self, run: Run, status: int) -> None:
        done = [f for f in run.finished if f is not None]
        ttfts = [f.timings.ttft_ms for f in done if f.timings]
        u = run.usage()
        req = run.request
        self.requests.keep_detail(
            RequestDetail(
                id=run.id,
                messages=tuple(
                    {"role": str(m.get("role", "")), "content": _clip(m.get("content"))}
                    for m in (req.messages or [])[-DETAIL_MESSAGES:]
                ),
                prompts=tuple(_clip(p) for p in req.prompts or ()),
                replies=tuple("".join(t) for t in run.texts),
                finish_reasons=tuple(f.reason for f in done),
                timings=tuple(f.timings.as_dict() for f in done if f.timings),
                error=run.error,
            )
        )
        self.requests.record(
            RequestRecord(
                id=run.id,
                finish_reason=done[0].reason if done else "",
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


def _clip(content: Any) -> str:
    """A message's text for the detail view, cut to DETAIL_MESSAGE_CHARS (parts joined)."""
    if isinstance(content, list):
        content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    text = "" if content is None else str(content)
    n = DETAIL_MESSAGE_CHARS
    return text if len(text) <= n else text[:n] + "…"


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
    if req.json_mode and req.grammar is not None:
        raise InvalidRequest(
            "grammar and response_format both constrain the reply; give one of them.",
            param="grammar",
        )
    if req.tools and req.messages is None:
        raise InvalidRequest("tools need a chat (messages), not a prompt.", param="tools")
    if req.json_mode and req.tools and req.choice.mode != "none":
        raise InvalidRequest(
            "response_format (or format) cannot be combined with tools: a reply held to a JSON "
            "schema cannot call a tool. Leave out one of them, or set tool_choice to 'none'.",
            param="response_format",
        )


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


@dataclass(frozen=True)
class Constraint:
    """The grammar a reply must follow, the request field it came from, and the schema the
    finished reply is still checked against (where the grammar holds it only in part)."""

    grammar: str
    param: str
    check: SchemaCheck | None = None


def constraint_grammar(req: GenerateRequest) -> Constraint | None:
    """The GBNF that enforces the requested output format (checked before anything loads).
    Blocking (a large schema takes a while): run it in a worker thread."""
    if req.grammar is not None:
        if not req.grammar.strip():
            raise InvalidRequest("grammar is empty.", param="grammar")
        check_grammar(req.grammar, param="grammar")
        return Constraint(req.grammar, "grammar")
    if not req.json_mode:
        return None
    grammar, check = json_constraint(req.json_schema, param="response_format")
    return Constraint(grammar, "response_format", check)


def has_tool_history(messages: list[dict[str, Any]]) -> bool:
    """Whether a conversation holds tool calls or results (the template must see them in its
    own shape even when this request offers no tools)."""
    return any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)


def upstream_tools(
    req: GenerateRequest,
) -> tuple[list[dict[str, Any]] | None, str | None, bool | None]:
    """`tools`, `tool_choice` and `parallel_tool_calls` for an upstream, in the form every
    OpenAI-compatible server reads: a named choice goes as that one tool and `required`
    (llama-server reads tool_choice only as a string and takes an object for `auto`), and the
    parallel flag always goes (llama-server's default is false, OpenAI's true)."""
    if not req.tools:
        return None, None, None
    choice = req.choice
    if choice.mode == "function":
        named = [t.openai() for t in req.tools if t.name == choice.name]
        return named, "required", False
    return [t.openai() for t in req.tools], choice.mode, req.parallel_tool_calls


def text_requests(req: GenerateRequest) -> list[GenerationRequest]:
    """One request per prompt and choice, as text, for an engine that takes text: the upstream
    applies its own template, tokenizer, context check and format constraint."""
    messages = req.messages
    if messages is not None and (req.tools or has_tool_history(messages)):
        messages = messages_for_openai(messages)  # typed calls, arguments as JSON text
    tools, choice, parallel = upstream_tools(req)
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
                    grammar=req.grammar,  # llama.cpp's extension: its servers and lmx read it
                    logit_bias=dict(req.logit_bias),
                    ignore_eos=req.ignore_eos,
                    label=req.label,
                    text=TextPrompt(
                        messages=messages,
                        prompt=prompt,
                        raw=req.raw,
                        sampling=req.sampling.given(i),
                        json_mode=req.json_mode,
                        json_schema=req.json_schema,
                        tools=tools,
                        tool_choice=choice,
                        parallel_tool_calls=parallel,
                    ),
                )
            )
    return out


def render(
    engine: Engine,
    req: GenerateRequest,
    *,
    constraint: Constraint | None = None,
    split_reasoning: bool = False,
    want_text: bool = False,
) -> Prompt:
    """The prompt tokens (the chat template over the messages, or each raw prompt), the grammar
    in force, and how the reply is to be read. Blocking: run it in a worker thread."""
    if req.messages is None:
        assert req.prompts is not None
        out = [engine.tokenize(p, add_special=True, special=req.raw) for p in req.prompts]
        if any(not p for p in out):
            raise InvalidRequest("prompt is empty.", param="prompt")
        if constraint is None:
            return Prompt(out)
        return Prompt(
            out, constraint.grammar, grammar_param=constraint.param, content_check=constraint.check
        )
    grammar = constraint.grammar if constraint is not None else None
    param = constraint.param if constraint is not None else "grammar"
    content_check = constraint.check if constraint is not None else None
    template = engine.chat_template
    messages = req.messages
    # A JSON or tool-call grammar holds the reply to its shape from the first token: no room to
    # think. A user's own grammar may spell out a thinking block, so it does not count here.
    held = grammar is not None and req.grammar is None
    plan: ToolCallPlan | None = None
    tools: list[dict[str, Any]] | None = None
    if req.tools or has_tool_history(messages):
        # A named choice asks for that one call (as OpenAI's does), not a list of them.
        parallel = req.parallel_tool_calls and req.choice.mode != "function"
        plan = plan_tool_calls(req.tools, req.choice, parallel=parallel, template=template)
        messages = plan.prepare_messages(messages)
        tools = plan.template_tools
        if plan.grammar is not None:
            if grammar is not None:
                raise InvalidRequest(
                    f"grammar cannot be combined with tool_choice '{req.choice.mode}', which "
                    "holds the reply to a tool call; give one of them.",
                    param="grammar",
                )
            grammar, param = plan.grammar, "tools"
            held = True
        if plan.parse_format is None:
            plan = None  # nothing to parse: the reply is plain text
    thinks = template is not None and template_thinks(template.source)
    think = req.think
    if think is None and held and thinks:
        think = False
    kwargs = {"enable_thinking": think} if think is not None else None
    # Only templates that know thinking blocks get the split: other replies stay untouched.
    split = split_reasoning and not held and thinks
    text: str | None = None
    if want_text or split:
        text = engine.render_chat(messages, tools=tools, template_kwargs=kwargs)
    tokens = engine.format_chat(messages, tools=tools, template_kwargs=kwargs)
    markers = list(plan.markers) if plan is not None else []
    if split:
        markers += [THINK_START, THINK_END]
    return Prompt(
        [tokens],
        grammar,
        plan,
        grammar_param=param,
        content_check=content_check,
        split_reasoning=split,
        starts_thinking=split and text is not None and prompt_opens_thinking(text),
        preserved_tokens=preserved_tokens(engine, markers),
        text=text,
    )


def preserved_tokens(engine: Engine, markers: list[str]) -> frozenset[int]:
    """The token ids of markers that are one token in this vocabulary (llama-server's
    "preserved tokens"): decoding drops control tokens' text unless told to keep it."""
    out: set[int] = set()
    for m in markers:
        ids = engine.tokenize(m, add_special=False, special=True)
        if len(ids) == 1:
            out.add(ids[0])
    return frozenset(out)


def build_requests(engine: Engine, req: GenerateRequest, prompt: Prompt) -> list[GenerationRequest]:
    """One engine request per prompt and choice; a prompt that leaves no room is refused."""
    limit = engine.context_length
    out = []
    for tokens in prompt.tokens:
        if len(tokens) >= limit:
            raise ContextOverflow(len(tokens), limit)
        room = limit - len(tokens)
        for i in range(req.n):
            out.append(
                GenerationRequest(
                    prompt_tokens=tokens,
                    max_tokens=min(req.max_tokens or room, room),
                    sampling=req.sampling.params(i),
                    stop=[s for s in req.stop if s],
                    grammar=prompt.grammar,
                    grammar_param=prompt.grammar_param,
                    logit_bias=dict(req.logit_bias),
                    ignore_eos=req.ignore_eos,
                    label=req.label,
                    preserved_tokens=prompt.preserved_tokens,
                    affinity=req.affinity,
                )
            )
    return out
