"""An engine that forwards to an upstream server (another OpenAI-compatible server: vLLM,
SGLang, llama-server, Ray Serve LLM, LiteLLM, another lmx).

It takes requests as text (`takes_text`): the upstream applies its own chat template and
tokenizer, so the messages or the prompt go as they came, with only the sampling fields the
caller set. Every request is streamed from the upstream (`stream_options.include_usage` asks
for its token counts; without them, each text chunk counts as one token) on one asyncio loop
in the engine's own thread, never the server's. Cancelling a generation closes its HTTP
stream, which is how an OpenAI server learns the client has gone. Connecting waits
CONNECT_TIMEOUT seconds at most; reading waits the upstream's `timeout`.

Tools go with the request as OpenAI spells them (`tools`, `tool_choice`): the upstream's own
template and parser make the calls, whose `tool_calls` deltas come back as `CallPiece` events
(its `reasoning_content` as `ThinkingText`), so every dialect lmx speaks can call tools on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import httpx

from server.chat_template import ChatTemplate
from server.discovery import ModelInfo
from server.engines.base import (
    CallPiece,
    EngineOptions,
    Finished,
    Generation,
    GenerationRequest,
    Sink,
    TextPrompt,
    ThinkingText,
    Timings,
    TokenText,
)
from server.errors import (
    EngineFailure,
    InvalidRequest,
    LmxError,
    ModelUnusable,
    QueueFull,
    UpstreamError,
    UpstreamUnavailable,
)
from server.upstreams import UpstreamModel, unreachable, upstream_error

T = TypeVar("T")
log = logging.getLogger(__name__)

# lmx's sampling names -> the names OpenAI-compatible servers read. repeat_penalty goes under
# both names: llama.cpp's servers and lmx read repeat_penalty, vLLM and SGLang
# repetition_penalty, and each ignores the other.
SAMPLING_FIELDS: dict[str, tuple[str, ...]] = {
    "temperature": ("temperature",),
    "top_p": ("top_p",),
    "top_k": ("top_k",),
    "min_p": ("min_p",),
    "repeat_penalty": ("repeat_penalty", "repetition_penalty"),
    "presence_penalty": ("presence_penalty",),
    "frequency_penalty": ("frequency_penalty",),
    "seed": ("seed",),
}
FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "cancelled"}
EMBED_TIMEOUT = 600.0


class _Forwarded(Generation):
    """A generation whose cancel also cancels its task on the engine's loop, which closes the
    upstream stream at once (even while it waits for the upstream's first byte)."""

    def __init__(
        self, request: GenerationRequest, sink: Sink, loop: asyncio.AbstractEventLoop
    ) -> None:
        super().__init__(request, sink)
        self.loop = loop
        self.task: asyncio.Task[None] | None = None
        self.started = False  # it holds one of the engine's slots (else it waits for one)

    def cancel(self) -> None:
        super().cancel()
        # Through the loop, after the call that made the task (the loop runs them in order).
        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing left to cancel
            self.loop.call_soon_threadsafe(self._cancel_task)

    def _cancel_task(self) -> None:
        if self.task is not None:
            self.task.cancel()


class UpstreamEngine:
    """One upstream model, as an engine: requests forwarded, streamed back as events."""

    takes_text = True
    chat_template: ChatTemplate | None = None  # its server applies its own template

    def __init__(self, info: ModelInfo, options: EngineOptions | None = None) -> None:
        if info.upstream is None:
            raise ValueError(f"{info.id} is not an upstream model")
        self.info = info
        self.options = options or EngineOptions()
        self.ref: UpstreamModel = info.upstream
        self.server = info.upstream.server
        self.on_failure: Callable[[str], None] | None = None
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._client: httpx.AsyncClient | None = None
        self._slots: asyncio.Semaphore | None = None
        self._held = False  # this engine holds its server (a managed process runs for it)
        self._closing = False
        self._gens: set[_Forwarded] = set()
        self.slots = self.server.config.parallel
        self.running = 0
        self.waiting = 0
        self.requests_total = 0
        self.tokens_generated = 0
        self.finished: Counter[str] = Counter()
        self.context = self.ref.context_length or 0

    # ----- the Engine protocol: life --------------------------------------------------------

    def load(self) -> None:
        """Make sure the upstream answers (starting it when lmx manages it); blocking."""
        self.server.acquire()
        self._held = True
        try:
            models = self.server.probe()
            if not self.ref.model:
                raise ModelUnusable(
                    f"upstream {self.server.name} answers again; rescan (or wait a moment) "
                    "and use one of its models",
                    param="model",
                )
            card = next((m for m in models if m.get("id") == self.ref.model), None)
            if card is not None:
                ctx = card.get("max_model_len") or card.get("context_length")
                if isinstance(ctx, int) and ctx > 0:
                    self.context = ctx
        except BaseException:
            self._held = False
            self.server.release()
            raise
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            self._client = httpx.AsyncClient(
                headers=self.server.headers(),
                timeout=self.server.timeout(),
                limits=httpx.Limits(max_connections=self.slots, max_keepalive_connections=8),
            )
            self._slots = asyncio.Semaphore(self.slots)
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self._client.aclose())
                loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name=f"upstream:{self.info.id}", daemon=True)
        self._thread.start()
        ready.wait()

    def close(self) -> None:
        """Cancel what is in flight, stop the loop, let go of the server (a managed process
        stops with its last model)."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            gens = list(self._gens)
        for g in gens:
            g.cancel()
        for g in gens:
            g.done.wait(5)  # each ends with a cancelled Finished once its stream is closed
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        if self._held:
            self._held = False
            self.server.release()

    @property
    def alive(self) -> bool:
        """False once a managed upstream's process has died (the scheduler then unloads the
        model, and the next request starts it again)."""
        return not self._held or self.server.running

    @property
    def context_length(self) -> int:
        """The upstream's context window when its model list states it (else 0: unknown)."""
        return self.context

    # ----- text in, text out (nothing to render or tokenize here) ---------------------------

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> str:
        raise self._text_only()

    def format_chat(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        raise self._text_only()

    def tokenize(self, text: str, *, add_special: bool = True, special: bool = True) -> list[int]:
        raise self._text_only()

    def detokenize(self, tokens: list[int]) -> str:
        raise self._text_only()

    def _text_only(self) -> InvalidRequest:
        return InvalidRequest(
            f"{self.info.id} is served by upstream {self.server.name}, which applies its own "
            "template and tokenizer; lmx sends it text only.",
            param="model",
        )

    # ----- requests --------------------------------------------------------------------------

    def submit(self, request: GenerationRequest, sink: Sink) -> Generation:
        """Queue a request; its events come from the engine's loop thread."""
        if request.text is None:
            raise InvalidRequest(
                f"{self.info.id} is served by upstream {self.server.name}: it takes messages "
                "or a prompt as text, not tokens.",
                param="prompt",
            )
        with self._lock:
            if self._closing or self._loop is None:
                raise EngineFailure(f"{self.info.id} is unloading")
            if self.running + self.waiting >= self.slots + self.options.max_queue:
                raise QueueFull(
                    f"{self.info.id}: {self.running} requests are at upstream "
                    f"{self.server.name} and {self.waiting} are waiting; retry shortly."
                )
            gen = _Forwarded(request, sink, self._loop)
            self.waiting += 1
            self.requests_total += 1
            self._gens.add(gen)
        self._loop.call_soon_threadsafe(self._start, gen)
        return gen

    def _start(self, gen: _Forwarded) -> None:
        """On the loop: the task that forwards `gen`, unless it was cancelled already."""
        assert self._loop is not None
        if gen.cancelled:
            self._settled(gen, None)
            return
        gen.task = self._loop.create_task(self._forward(gen))
        gen.task.add_done_callback(lambda task: self._settled(gen, task))

    def _settled(self, gen: _Forwarded, task: asyncio.Task[None] | None) -> None:
        """On the loop, once `gen`'s task is over: every generation ends with one Finished,
        even one cancelled before it reached the upstream."""
        if not gen.done.is_set():
            if task is None or task.cancelled():
                self._finish(gen, Finished("cancelled", 0, 0))
            else:
                exc = task.exception()
                log.error("forwarding to %s failed: %r", self.server.name, exc)
                self._finish(gen, Finished("error", 0, 0, error=f"engine failure: {exc}"))
        with self._lock:
            if not gen.started:
                self.waiting -= 1
            self._gens.discard(gen)

    def _finish(self, gen: Generation, fin: Finished) -> None:
        with self._lock:
            self.finished[fin.reason] += 1
            self.tokens_generated += fin.completion_tokens
        gen.emit(fin)

    async def _forward(self, gen: _Forwarded) -> None:
        assert self._slots is not None
        await self._slots.acquire()
        with self._lock:
            gen.started = True
            self.waiting -= 1
            self.running += 1
        try:
            await _Stream(self, gen).run()
        finally:
            with self._lock:
                self.running -= 1
            self._slots.release()

    def body(
        self, req: GenerationRequest, *, schema_as_json_object: bool = False
    ) -> dict[str, Any]:
        """The OpenAI request for `req`: only what the caller set, so the upstream's own
        defaults stand for the rest."""
        text = req.text
        assert text is not None
        body: dict[str, Any] = {"model": self.ref.model, "stream": True}
        if text.messages is not None:
            body["messages"] = text.messages
        else:
            body["prompt"] = text.prompt
        body["stream_options"] = {"include_usage": True}
        if req.max_tokens > 0:
            body["max_tokens"] = req.max_tokens
        for name, value in text.sampling.items():
            for wire in SAMPLING_FIELDS.get(name, ()):
                body[wire] = value
        if req.stop:
            body["stop"] = list(req.stop)
        if req.logit_bias:
            body["logit_bias"] = {str(k): v for k, v in req.logit_bias.items()}
        if req.ignore_eos:
            body["ignore_eos"] = True  # vLLM's, SGLang's and lmx's extension
        if req.grammar:
            body["grammar"] = req.grammar  # llama.cpp's extension (llama-server, lmx)
        fmt = response_format(text, schema_as_json_object)
        if fmt is not None:
            body["response_format"] = fmt
        if text.tools:
            body["tools"] = text.tools
            if text.tool_choice is not None:
                body["tool_choice"] = text.tool_choice
            if text.parallel_tool_calls is not None:
                body["parallel_tool_calls"] = text.parallel_tool_calls
        return body

    def path_for(self, text: TextPrompt) -> str:
        return "/chat/completions" if text.messages is not None else "/completions"

    def rerank(
        self, query: str, documents: list[str], instruction: str | None = None
    ) -> tuple[list[float], int]:
        """The upstream's rerank (llama-server, vLLM, LocalAI take this shape)."""

        def parse(data: Any) -> list[float]:
            scores = [0.0] * len(documents)
            for item in data["results"]:
                scores[int(item["index"])] = float(item["relevance_score"])
            return scores

        body = {"model": self.ref.model, "query": query, "documents": documents}
        return self._side_call("/rerank", body, parse, "rerank")

    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """The upstream's embeddings (blocking; called from a worker thread)."""

        def parse(data: Any) -> list[list[float]]:
            items = sorted(data["data"], key=lambda d: d.get("index", 0))
            return [[float(x) for x in d["embedding"]] for d in items]

        body = {"model": self.ref.model, "input": texts}
        return self._side_call("/embeddings", body, parse, "embeddings")

    def _side_call(
        self, path: str, body: dict[str, Any], parse: Callable[[Any], T], what: str
    ) -> tuple[T, int]:
        """POST `body` to the upstream's `path` from a worker thread: what `parse` makes of
        the answer, and the prompt tokens its usage reports."""
        if self._loop is None or self._closing:
            raise EngineFailure(f"{self.info.id} is unloading")
        future = asyncio.run_coroutine_threadsafe(self._post(path, body, parse, what), self._loop)
        return future.result(EMBED_TIMEOUT)

    async def _post(
        self, path: str, body: dict[str, Any], parse: Callable[[Any], T], what: str
    ) -> tuple[T, int]:
        assert self._client is not None
        try:
            r = await self._client.post(self.server.url + path, json=body)
        except httpx.HTTPError as e:
            raise unreachable(self.server.name, self.server.url, e) from e
        if r.status_code != 200:
            raise upstream_error(self.server.name, r.status_code, r.content)
        try:
            data = r.json()
            return parse(data), int((data.get("usage") or {}).get("prompt_tokens") or 0)
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
            raise UpstreamError(
                f"upstream {self.server.name} answered {what} in an unknown shape: {e!r}",
                status=502,
            ) from e

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "slots": self.slots,
                "slots_busy": self.running,
                "queue_depth": self.waiting,
                "requests_total": self.requests_total,
                "tokens_generated": self.tokens_generated,
                "finished": dict(self.finished),
            }

    def cancel_all(self) -> None:
        with self._lock:
            gens = list(self._gens)
        for g in gens:
            g.cancel()


def response_format(text: TextPrompt, schema_as_json_object: bool) -> dict[str, Any] | None:
    """OpenAI's `response_format` for the requested output: `json_schema` with a schema (vLLM,
    SGLang, lmx), or llama-cpp-python's `json_object` + `schema` when the upstream refused the
    former."""
    if not text.json_mode:
        return None
    if text.json_schema is None:
        return {"type": "json_object"}
    if schema_as_json_object:
        return {"type": "json_object", "schema": text.json_schema}
    return {"type": "json_schema", "json_schema": {"name": "response", "schema": text.json_schema}}


class _Stream:
    """One forwarded request: the HTTP stream, its chunks as events, its usage and timings."""

    def __init__(self, engine: UpstreamEngine, gen: _Forwarded) -> None:
        self.engine = engine
        self.gen = gen
        self.req = gen.request
        self.started = time.perf_counter()
        self.first_at: float | None = None
        self.chunks = 0
        self.usage: dict[str, Any] = {}
        self.reason: str | None = None

    async def run(self) -> None:
        eng, gen = self.engine, self.gen
        if gen.cancelled:
            eng._finish(gen, Finished("cancelled", 0, 0))
            return
        try:
            failure = await self._request(schema_as_json_object=False)
            text = self.req.text
            if (
                failure is not None
                and failure.status == 400
                and text is not None
                and text.json_mode
                and text.json_schema is not None
            ):
                # llama-cpp-python's server knows only json_object (+ schema): ask it that way.
                failure = await self._request(schema_as_json_object=True)
        except asyncio.CancelledError:
            self._end("cancelled")
            raise
        except httpx.TimeoutException as e:
            if self.chunks:
                self._end("error", error=f"upstream {eng.server.name} stopped answering: {e!r}")
            else:
                self._fail(unreachable(eng.server.name, eng.server.url, e))
            return
        except httpx.HTTPError as e:
            if self.chunks:
                self._end("error", error=f"upstream {eng.server.name} broke the stream: {e!r}")
            else:
                self._fail(unreachable(eng.server.name, eng.server.url, e))
            return
        if failure is not None and self.chunks:  # it failed after sending some text
            self._end("error", error=failure.message)
        elif failure is not None:
            self._fail(failure)
        elif self.reason is None:
            self._end("error", error=f"upstream {eng.server.name} ended the stream early")
        else:
            self._end(self.reason)

    async def _request(self, *, schema_as_json_object: bool) -> LmxError | None:
        """Send the request and read its answer; an error status comes back as an LmxError."""
        eng = self.engine
        text = self.req.text
        assert eng._client is not None and text is not None
        body = eng.body(self.req, schema_as_json_object=schema_as_json_object)
        url = eng.server.url + eng.path_for(text)
        async with eng._client.stream("POST", url, json=body) as r:
            eng.server.report(None)  # it answers (if it was listed as down, it is back)
            if r.status_code != 200:
                return upstream_error(eng.server.name, r.status_code, await r.aread())
            if r.headers.get("content-type", "").startswith("application/json"):
                self._chunk(json.loads(await r.aread()), whole=True)  # it did not stream
                return None
            async for data in _sse_data(r.aiter_lines()):
                if data == "[DONE]":
                    break
                try:
                    chunk = json.loads(data)
                except ValueError:
                    continue
                if isinstance(chunk, dict) and chunk.get("error"):
                    message, _ = _error_message(chunk)
                    self.reason = None
                    return EngineFailure(f"upstream {eng.server.name}: {message}")
                if isinstance(chunk, dict):
                    self._chunk(chunk, whole=False)
        return None

    def _chunk(self, chunk: dict[str, Any], *, whole: bool) -> None:
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict):
                continue
            part = choice.get("message") if whole else choice.get("delta")
            events: list[TokenText | ThinkingText | CallPiece] = []
            if not isinstance(part, dict):  # a text completion
                events += _text(TokenText, choice.get("text"))
            else:
                # Thinking under either name (lmx sends both, with the same text).
                thinking = part.get("reasoning_content") or part.get("reasoning")
                events += _text(ThinkingText, thinking)
                events += _text(TokenText, part.get("content"))
                calls = part.get("tool_calls")
                for k, call in enumerate(calls if isinstance(calls, list) else []):
                    events += _call(call, k)
            if events:  # one chunk, one token (when the upstream reports no usage)
                if self.first_at is None:
                    self.first_at = time.perf_counter()
                self.chunks += 1
            for ev in events:
                self.gen.emit(ev)
            reason = choice.get("finish_reason")
            if isinstance(reason, str) and reason:
                self.reason = FINISH_REASONS.get(reason, "stop")

    def _counts(self) -> tuple[int, int, int]:
        u = self.usage
        prompt = int(u.get("prompt_tokens") or 0)
        completion = int(u.get("completion_tokens") or 0) if "completion_tokens" in u else None
        cached = int((u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        return prompt, self.chunks if completion is None else completion, cached

    def _end(self, reason: str, error: str | None = None) -> None:
        prompt, completion, cached = self._counts()
        end = time.perf_counter()
        first = self.first_at or end
        submitted = self.gen.submitted_at
        timings = Timings(
            queue_ms=(self.started - submitted) * 1000,
            ttft_ms=(first - submitted) * 1000,
            prompt_tokens=prompt,
            cached_tokens=cached,
            prefill_tokens_per_s=prompt / max(first - self.started, 1e-9),
            decode_tokens_per_s=(completion - 1) / (end - first)
            if completion > 1 and end > first
            else 0.0,
            total_ms=(end - submitted) * 1000,
        )
        self.engine._finish(
            self.gen, Finished(reason, prompt, completion, cached, timings, error=error)
        )

    def _fail(self, failure: LmxError) -> None:
        """An error before the stream started (or in place of it)."""
        if isinstance(failure, UpstreamUnavailable):
            self.engine.server.report(failure)  # listed as unreachable from the next probe
        self.engine._finish(
            self.gen, Finished("error", 0, 0, error=failure.message, failure=failure)
        )


def _text(kind: type[TokenText] | type[ThinkingText], piece: Any) -> list[Any]:
    return [kind(piece)] if isinstance(piece, str) and piece else []


def _call(call: Any, position: int) -> list[CallPiece]:
    """One entry of `tool_calls`: a whole call, or a streamed delta of one (a server that
    leaves out `index` gets the entry's position in its chunk)."""
    if not isinstance(call, dict):
        return []
    fn: dict[str, Any] = call["function"] if isinstance(call.get("function"), dict) else {}
    args = fn.get("arguments")
    if isinstance(args, dict):  # some servers send the object itself
        args = json.dumps(args, ensure_ascii=False)
    index, cid, name = call.get("index"), call.get("id"), fn.get("name")
    return [
        CallPiece(
            index if isinstance(index, int) else position,
            cid if isinstance(cid, str) else None,
            name if isinstance(name, str) else None,
            args if isinstance(args, str) else "",
        )
    ]


def _error_message(chunk: dict[str, Any]) -> tuple[str, str | None]:
    err = chunk.get("error")
    if isinstance(err, dict):
        return str(err.get("message") or err), err.get("param")
    return str(err), None


async def _sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The data of each server-sent event (its `data:` lines joined), as the SSE spec reads
    them; comments, `event:` and `id:` lines are skipped."""
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
        elif line.startswith("data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        yield "\n".join(data)
