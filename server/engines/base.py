"""What every engine speaks: generation requests in, token events out."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from server.chat_template import ChatTemplate
    from server.discovery import ModelInfo
    from server.engines.prefix_store import PrefixStore
    from server.errors import LmxError


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings (defaults follow llama.cpp's)."""

    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None

    @classmethod
    def merged(cls, **given: Any) -> SamplingParams:
        """The defaults, overridden by every value a request gave (None: not given)."""
        return cls(**{k: v for k, v in given.items() if v is not None})


@dataclass(frozen=True)
class TextPrompt:
    """A request as text, for an engine that applies its own template and tokenizer (an
    upstream server): the chat messages or the prompt, what the caller set, the output format."""

    messages: list[dict[str, Any]] | None = None  # role, content (text), name
    prompt: str | None = None  # a text completion's prompt (when messages is None)
    raw: bool = False  # the prompt may hold special tokens (Ollama's raw mode)
    sampling: dict[str, Any] = field(default_factory=dict)  # only the fields the caller set
    json_mode: bool = False
    json_schema: dict[str, Any] | None = None  # with json_mode: the schema to match
    # Tool calling, spelled as OpenAI's chat API spells it: the upstream's own template and
    # parser handle the calls, which come back as `CallPiece` events.
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # None: the upstream's default


@dataclass
class GenerationRequest:
    """A tokenized prompt plus how to continue it (for an engine that `takes_text`, `text`
    instead, and `prompt_tokens` empty)."""

    prompt_tokens: list[int]
    max_tokens: int  # 0 with `text`: the caller set no limit (the upstream's default applies)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    grammar: str | None = None
    grammar_param: str = "grammar"  # the request field the grammar came from (for errors)
    logit_bias: dict[int, float] = field(default_factory=dict)
    ignore_eos: bool = False  # generate max_tokens whatever the model says (benchmarks, tests)
    label: str = ""  # who asked (api, tui, cli): shown in logs and the requests pane
    text: TextPrompt | None = None  # set for engines that take text
    # Control tokens given as their text (tool-call and thinking markers the reply's parser
    # reads); every other special token is decoded to nothing, as before.
    preserved_tokens: frozenset[int] = frozenset()
    # Who the prompt belongs to (a coding agent's subagent id, a client's prompt_cache_key):
    # its slot is kept for it, so another conversation does not take over its cached prefix.
    affinity: str | None = None


@dataclass(frozen=True)
class TokenText:
    """A piece of generated text (one or more tokens' worth, stop strings held back)."""

    text: str


@dataclass(frozen=True)
class Timings:
    """Per-request figures, kept for metrics and returned with the response."""

    queue_ms: float
    ttft_ms: float
    prompt_tokens: int
    cached_tokens: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    total_ms: float

    def as_dict(self) -> dict[str, Any]:
        return {k: round(v, 2) if isinstance(v, float) else v for k, v in self.__dict__.items()}

    @classmethod
    def measure(
        cls,
        *,
        queued: float,
        started: float | None,
        first_token: float | None,
        end: float,
        prompt_tokens: int,
        cached: int,
        generated: int,
    ) -> Timings:
        """A request's figures from its perf_counter() marks, the same way in every engine."""
        start = started or end
        first = first_token or end
        prefill_s = first - start
        decode_s = end - first
        return cls(
            queue_ms=(start - queued) * 1000,
            ttft_ms=(first - queued) * 1000,
            prompt_tokens=prompt_tokens,
            cached_tokens=cached,
            # No rate where no prefill was timed (ended before it started, say).
            prefill_tokens_per_s=(prompt_tokens - cached) / prefill_s if prefill_s > 1e-6 else 0.0,
            decode_tokens_per_s=(generated - 1) / decode_s if generated > 1 and decode_s else 0.0,
            total_ms=(end - queued) * 1000,
        )


@dataclass(frozen=True)
class Finished:
    """The last event of a generation."""

    reason: str  # stop | length | cancelled | error
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    timings: Timings | None = None
    error: str | None = None
    # The typed cause of an "error", when the engine knows one (an upstream's status): the
    # pipeline raises it, in the caller's dialect, if it came before any text.
    failure: LmxError | None = None
    stop_sequence: str | None = None  # the stop string that ended it (reason "stop")


@dataclass(frozen=True)
class ThinkingText:
    """Thinking an engine split out itself (an upstream's `reasoning_content`)."""

    text: str


@dataclass(frozen=True)
class CallPiece:
    """A piece of a tool call an engine parsed itself (an upstream's `tool_calls` deltas): call
    `index` of this reply; its id and name come with its first piece, and its `arguments`
    fragments join to the call's JSON text."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


Event = TokenText | ThinkingText | CallPiece | Finished
Sink = Callable[[Event], None]


@dataclass
class Progress:
    """Live counters of one generation, written by the engine's thread as it works and read
    by anyone (plain ints: a reader sees a recent value, never a torn one)."""

    slot: int | None = None  # the engine's slot (sequence) once admitted; None while queued
    cached: int = 0  # prompt tokens reused from the cache
    prompt_done: int = 0  # prompt tokens in the cache so far (cached ones included)
    generated: int = 0
    first_token_at: float | None = None  # perf_counter

    def phase(self, prompt_tokens: int) -> str:
        """queued, prefill or decode."""
        if self.slot is None:
            return "queued"
        return "decode" if self.generated or self.prompt_done >= prompt_tokens else "prefill"


class Generation:
    """A submitted request. The engine calls `emit`; anyone may `cancel`."""

    def __init__(self, request: GenerationRequest, sink: Sink) -> None:
        self.request = request
        self._sink = sink
        self._cancelled = threading.Event()
        self.done = threading.Event()
        self.submitted_at = time.perf_counter()
        self.progress = Progress()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def emit(self, event: Event) -> None:
        if self.done.is_set():
            return
        if isinstance(event, Finished):
            self.done.set()
        # A consumer that went away must never break the engine's loop.
        with contextlib.suppress(Exception):
            self._sink(event)


@dataclass(frozen=True)
class Offload:
    """Where llama.cpp puts a model's layers, as the scheduler chose (server/offload.py)."""

    layers: int  # llama.cpp's n_gpu_layers: the last `layers` of block_count + 1 (output)
    main_gpu: int | None = None  # all on this GPU alone (llama.cpp's split_mode none)
    tensor_split: tuple[float, ...] = ()  # spread: each GPU's share (split_mode layer)


@dataclass
class EngineOptions:
    """How to load one model (any engine; each reads the fields that apply to it)."""

    n_ctx: int = 4096  # per slot
    parallel: int = 4
    threads: int = 0  # 0: all physical cores
    gpu_layers: int = -1  # the setting; -1: as many as fit (auto)
    max_queue: int = 64
    n_batch: int = 512
    chat_template: str | None = None
    cache_type_k: str = "f16"  # KV cache types: f16, q8_0, q4_0
    cache_type_v: str = "f16"
    # Where slot prefixes go when a slot is reused or the model unloads, and come back from.
    prefix_store: PrefixStore | None = field(default=None, compare=False, repr=False)
    # Temperature-0 text identical alone and batched; False trades that for llama-server's
    # ubatch (faster long prefills, the last bits of a logit may depend on batch neighbours).
    batch_invariant: bool = True
    main_gpu: int | None = None  # the setting; None: lmx chooses
    # What the scheduler chose from gpu_layers / main_gpu and free VRAM; None: no NVIDIA GPU
    # known, gpu_layers goes to the engine as set (Metal, Vulkan: llama.cpp decides).
    offload: Offload | None = None


class Engine(Protocol):
    """One loaded model, whatever runs it (llama.cpp, MLX, an upstream server).

    Nothing above `server/engines/` names a concrete engine: the scheduler gets engines from
    `server.engines.create_engine` (or a factory a test injects) and speaks only this.
    """

    info: ModelInfo
    # Set by the scheduler: called once, from the engine's own thread, if it dies.
    on_failure: Callable[[str], None] | None
    # False: the pipeline renders the chat template and tokenizes (llama.cpp, MLX). True: the
    # engine gets the request as text (`GenerationRequest.text`) and something else applies
    # the template and tokenizer (an upstream server); such an engine may refuse a request
    # after `submit` (a `Finished` error with a `failure`), so the pipeline waits for each
    # choice's first event before answering.
    takes_text: bool

    def load(self) -> None:
        """Load weights (blocking; called from a worker thread)."""
        ...

    def close(self) -> None:
        """Cancel everything and free the model's memory."""
        ...

    @property
    def alive(self) -> bool:
        """False once the engine can no longer serve (its decode loop died)."""
        ...

    @property
    def context_length(self) -> int: ...

    # The model's Jinja chat template (None: it has none, or is not a local model); what
    # `server.toolcalls.plan_tool_calls` reads to choose how to ask for tool calls.
    chat_template: ChatTemplate | None

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> str:
        """The prompt text the model's chat template makes of `messages` (and `tools`, in
        OpenAI's `{"type": "function", "function": {...}}` shape, for templates that take them).
        `template_kwargs` become template variables (`enable_thinking`, ...)."""
        ...

    def format_chat(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        """`render_chat`, tokenized as the model expects (BOS handled)."""
        ...

    def tokenize(
        self, text: str, *, add_special: bool = True, special: bool = True
    ) -> list[int]: ...

    def detokenize(self, tokens: list[int]) -> str: ...

    def submit(self, request: GenerationRequest, sink: Sink) -> Generation:
        """Queue a request; events go to `sink` from the engine's thread."""
        ...

    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]: ...

    def rerank(
        self, query: str, documents: list[str], instruction: str | None = None
    ) -> tuple[list[float], int]:
        """A relevance score in [0, 1] per document (server.engines.rerank), and the tokens
        read."""
        ...

    def stats(self) -> dict[str, Any]:
        """slots, slots_busy, queue_depth, requests_total, tokens_generated, finished."""
        ...

    def cancel_all(self) -> None: ...


async def stream(
    engine: Engine, requests: list[GenerationRequest]
) -> AsyncIterator[tuple[int, Event]]:
    """Submit `requests` together and yield `(index, event)` on the caller's event loop.

    They decode in the same batch. Leaving the iteration early (a client that disconnected)
    cancels every generation still running.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

    def sink_for(i: int) -> Sink:
        def sink(ev: Event) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (i, ev))

        return sink

    gens: list[Generation] = []
    try:
        for i, req in enumerate(requests):
            gens.append(engine.submit(req, sink_for(i)))
        remaining = len(gens)
        while remaining:
            i, ev = await queue.get()
            if isinstance(ev, Finished):
                remaining -= 1
            yield i, ev
    finally:
        for g in gens:
            g.cancel()


def collect(engine: Engine, request: GenerationRequest) -> tuple[str, Finished]:
    """Run a request to the end from a plain thread (CLI, tests): the answer text."""
    import queue as _queue

    q: _queue.Queue[Event] = _queue.Queue()
    gen = engine.submit(request, q.put)
    parts: list[str] = []
    try:
        while True:
            ev = q.get()
            if isinstance(ev, Finished):
                return "".join(parts), ev
            if isinstance(ev, TokenText):
                parts.append(ev.text)
    finally:
        gen.cancel()


class FinishingJob(Protocol):
    """What an engine's job knows as it streams and ends: what `emit_text` and `finish_job`
    read and write."""

    gen: Generation
    decoder: Any  # an incremental UTF-8 decoder
    queued_at: float
    started_at: float
    first_token_at: float
    cached: int
    n_gen: int
    text_held: str
    stopped_by: str | None


def finish_job(
    job: FinishingJob, reason: str, error: str | None, record: Callable[[str, Timings], None]
) -> None:
    """End a job the same way in every engine: the text held back as a possible stop string
    is real text (a matched stop string has already cleared it), whatever ended the request;
    then its timings, given to `record` before the client can see the Finished event."""
    if job.text_held and reason != "error":
        job.gen.emit(TokenText(job.text_held))
    n_prompt = len(job.gen.request.prompt_tokens)
    timings = Timings.measure(
        queued=job.queued_at,
        started=job.started_at,
        first_token=job.first_token_at,
        end=time.perf_counter(),
        prompt_tokens=n_prompt,
        cached=job.cached,
        generated=job.n_gen,
    )
    record(reason, timings)
    job.gen.emit(
        Finished(
            reason, n_prompt, job.n_gen, job.cached, timings, error, stop_sequence=job.stopped_by
        )
    )


def emit_text(job: FinishingJob, piece: bytes) -> bool:
    """Send a token's text, holding back what could be the start of a stop string (and
    finishing on one that matched). True: a stop string matched."""
    text = job.text_held + job.decoder.decode(piece)
    stops = job.gen.request.stop
    for s in stops:
        k = text.find(s)
        if k >= 0:
            if k:
                job.gen.emit(TokenText(text[:k]))
            job.text_held = ""
            job.stopped_by = s
            return True
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    out, job.text_held = (text[:-hold], text[-hold:]) if hold else (text, "")
    if out:
        job.gen.emit(TokenText(out))
    return False
