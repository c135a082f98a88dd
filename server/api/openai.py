"""The OpenAI-compatible API: /v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings."""

from __future__ import annotations

import asyncio
import base64
import struct
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from litestar import Controller, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody
from litestar.response import Stream

from server.api.schemas import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    EmbeddingRequest,
    ResponseFormat,
    SamplingFields,
)
from server.discovery import ModelInfo
from server.engines import Engine
from server.engines.base import Finished, GenerationRequest, SamplingParams, TokenText, stream
from server.errors import ContextOverflow, EngineFailure, InvalidRequest
from server.grammar import json_grammar
from server.registry import LoadedModel, Registry
from server.settings import PresetConfig, parse_duration
from server.telemetry import RequestRecord


def model_card(info: ModelInfo, registry: Registry) -> dict[str, Any]:
    lm = registry.get_loaded(info.id)
    return {
        "id": info.id,
        "object": "model",
        "created": int(info.path.stat().st_mtime) if info.path.exists() else 0,
        "owned_by": "lmx",
        "lmx": {**info.describe(), "state": lm.state if lm else "available"},
    }


def _messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            parts = []
            for part in content:
                kind = part.get("type")
                if kind == "text" and isinstance(part.get("text"), str):
                    parts.append(part["text"])
                else:
                    raise InvalidRequest(
                        f"messages[{i}].content has a part of type {kind!r}; only text parts "
                        "are supported by this model.",
                        param=f"messages[{i}].content",
                    )
            content = "".join(parts)
        msg: dict[str, Any] = {
            "role": "system" if m.role == "developer" else m.role,
            "content": content or "",
        }
        if m.name:
            msg["name"] = m.name
        out.append(msg)
    return out


def keep_alive_value(value: str | int | float | None) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as e:
        raise InvalidRequest(str(e), param="keep_alive") from e


PRESET_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "max_tokens", "stop")


def with_preset(registry: Registry, body: Any) -> tuple[Any, PresetConfig | None]:
    """A request to a preset's id: its base model, and its defaults where the request is silent."""
    p = registry.preset(body.model)
    if p is None:
        return body, None
    changes: dict[str, Any] = {"model": p.model}
    for f in PRESET_FIELDS:
        if getattr(body, f) is None and getattr(p, f) is not None:
            changes[f] = getattr(p, f)
    return msgspec.structs.replace(body, **changes), p


def _grammar(rf: ResponseFormat | None) -> str | None:
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object":
        return json_grammar(rf.schema)
    if rf.json_schema is None or rf.json_schema.schema is None:
        raise InvalidRequest(
            "response_format json_schema needs json_schema.schema.", param="response_format"
        )
    return json_grammar(rf.json_schema.schema)


def _sampling(body: SamplingFields, index: int) -> SamplingParams:
    seed = body.seed
    if seed is not None and index:
        seed += index  # n choices with one seed must still differ, reproducibly
    return SamplingParams.merged(
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        min_p=body.min_p,
        repeat_penalty=body.repeat_penalty,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        seed=seed,
    )


def _requests(
    engine: Engine,
    body: SamplingFields,
    prompts: list[list[int]],
    max_tokens: int | None,
    grammar: str | None,
) -> list[GenerationRequest]:
    if body.logprobs:
        raise InvalidRequest("logprobs are not supported.", param="logprobs")
    limit = engine.context_length
    try:
        bias = {int(k): v for k, v in (body.logit_bias or {}).items()}
    except ValueError as e:
        raise InvalidRequest("logit_bias keys must be token ids.", param="logit_bias") from e
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    stop = [s for s in stop if s]
    out = []
    for prompt in prompts:
        if len(prompt) >= limit:
            raise ContextOverflow(len(prompt), limit)
        room = limit - len(prompt)
        for i in range(body.n):
            out.append(
                GenerationRequest(
                    prompt_tokens=prompt,
                    max_tokens=min(max_tokens or room, room),
                    sampling=_sampling(body, i),
                    stop=stop,
                    grammar=grammar,
                    logit_bias=bias,
                    ignore_eos=body.ignore_eos,
                    label="api",
                )
            )
    return out


def _usage(finished: list[Finished], n_prompts_counted: int) -> dict[str, Any]:
    # The prompt is counted once per distinct prompt, as OpenAI does for n > 1.
    prompt = sum(f.prompt_tokens for f in finished[:: max(1, n_prompts_counted)])
    completion = sum(f.completion_tokens for f in finished)
    cached = sum(f.cached_tokens for f in finished[:: max(1, n_prompts_counted)])
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _timings(finished: list[Finished]) -> list[dict[str, Any]]:
    return [f.timings.as_dict() for f in finished if f.timings]


def _check_errors(finished: list[Finished]) -> None:
    for f in finished:
        if f.reason == "error":
            raise EngineFailure(f.error or "generation failed")


def log_request(
    registry: Registry,
    path: str,
    model: str | None,
    status: int,
    finished: list[Finished],
    started: float,
) -> None:
    """Record a finished request for the TUI's requests pane and for metrics."""
    ttfts = [f.timings.ttft_ms for f in finished if f.timings]
    registry.requests.record(
        RequestRecord(
            at=time.time(),
            method="POST",
            path=path,
            model=model,
            status=status,
            prompt_tokens=sum(f.prompt_tokens for f in finished[:1]),
            completion_tokens=sum(f.completion_tokens for f in finished),
            cached_tokens=sum(f.cached_tokens for f in finished[:1]),
            latency_ms=(time.perf_counter() - started) * 1000,
            ttft_ms=min(ttfts) if ttfts else None,
        )
    )


class _Lease:
    """A request's hold on its model: released when the response (or its stream) ends."""

    def __init__(self, registry: Registry, lm: LoadedModel, keep_alive: float | None) -> None:
        self.registry, self.lm, self.keep_alive = registry, lm, keep_alive
        self.streaming = False
        self.released = False

    def hand_to_stream(self) -> _Lease:
        self.streaming = True
        return self

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.registry.release(self.lm, self.keep_alive)

    def release_unless_streaming(self) -> None:
        if not self.streaming:
            self.release()


def _sse(obj: Any) -> bytes:
    return b"data: " + msgspec.json.encode(obj) + b"\n\n"


class OpenAIController(Controller):
    """OpenAI's wire format, over the shared registry."""

    path = "/v1"
    tags = ["openai"]  # noqa: RUF012

    @get("/models")
    async def list_models(self, registry: NamedDependency[Registry]) -> dict[str, Any]:
        data = [model_card(m, registry) for m in registry.models() if m.usable]
        for name, p in sorted(registry.settings.presets.items()):
            data.append(
                {
                    "id": name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "lmx",
                    "lmx": {"preset_of": p.model, "system": p.system},
                }
            )
        return {"object": "list", "data": data}

    @get("/models/{model_id:path}")
    async def get_model(
        self, registry: NamedDependency[Registry], model_id: FromPath[str]
    ) -> dict[str, Any]:
        return model_card(registry.resolve(model_id.lstrip("/")), registry)

    @post("/chat/completions", status_code=200)
    async def chat_completions(
        self, registry: NamedDependency[Registry], data: JSONBody[ChatCompletionRequest]
    ) -> Any:
        started = time.perf_counter()
        if data.tools:
            raise InvalidRequest("Tool calling is not supported yet.", param="tools")
        data, preset = with_preset(registry, data)
        messages = _messages(data.messages)
        if preset and preset.system and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": preset.system})
        grammar = _grammar(data.response_format)
        ka = keep_alive_value(data.keep_alive)
        lm = await asyncio.to_thread(registry.acquire, data.model)
        lease = _Lease(registry, lm, ka)
        try:
            return await self._chat(registry, data, lm, lease, messages, grammar, started)
        finally:
            lease.release_unless_streaming()

    async def _chat(
        self,
        registry: Registry,
        data: ChatCompletionRequest,
        lm: LoadedModel,
        lease: _Lease,
        messages: list[dict[str, Any]],
        grammar: str | None,
        started: float,
    ) -> Any:
        engine = lm.engine
        prompt = await asyncio.to_thread(engine.format_chat, messages)
        reqs = _requests(
            engine, data, [prompt], data.max_completion_tokens or data.max_tokens, grammar
        )
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        log = (registry, "/v1/chat/completions", lm.info.id)
        if data.stream:
            include_usage = bool(data.stream_options and data.stream_options.include_usage)
            head = [
                {
                    "index": i,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
                for i in range(len(reqs))
            ]
            return Stream(
                _sse_stream(
                    engine,
                    reqs,
                    head=head,
                    choice=_chat_choice,
                    obj="chat.completion.chunk",
                    cid=cid,
                    created=created,
                    model=lm.info.id,
                    include_usage=include_usage,
                    n=data.n,
                    log=log,
                    started=started,
                    lease=lease.hand_to_stream(),
                ),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        texts, finished = await _gather(engine, reqs)
        log_request(*log, 200, finished, started)
        return {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": lm.info.id,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": texts[i]},
                    "logprobs": None,
                    "finish_reason": finished[i].reason,
                }
                for i in range(len(reqs))
            ],
            "usage": _usage(finished, data.n),
            "timings": _timings(finished),
        }

    @post("/completions", status_code=200)
    async def completions(
        self, registry: NamedDependency[Registry], data: JSONBody[CompletionRequest]
    ) -> Any:
        started = time.perf_counter()
        data, _ = with_preset(registry, data)
        prompts_text = [data.prompt] if isinstance(data.prompt, str) else data.prompt
        if not all(isinstance(p, str) for p in prompts_text):
            raise InvalidRequest("prompt must be a string or a list of strings.", param="prompt")
        grammar = _grammar(data.response_format)
        ka = keep_alive_value(data.keep_alive)
        lm = await asyncio.to_thread(registry.acquire, data.model)
        lease = _Lease(registry, lm, ka)
        try:
            return await self._complete(registry, data, lm, lease, prompts_text, grammar, started)
        finally:
            lease.release_unless_streaming()

    async def _complete(
        self,
        registry: Registry,
        data: CompletionRequest,
        lm: LoadedModel,
        lease: _Lease,
        prompts_text: list[str],
        grammar: str | None,
        started: float,
    ) -> Any:
        engine = lm.engine
        prompts = [engine.tokenize(p, add_special=True, special=False) for p in prompts_text]
        if any(not p for p in prompts):
            raise InvalidRequest("prompt is empty.", param="prompt")
        reqs = _requests(engine, data, prompts, data.max_tokens, grammar)
        cid = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        log = (registry, "/v1/completions", lm.info.id)
        echo = [prompts_text[i // data.n] if data.echo else "" for i in range(len(reqs))]
        if data.stream:
            include_usage = bool(data.stream_options and data.stream_options.include_usage)
            head = [_text_choice(i, t, None) for i, t in enumerate(echo) if t]
            return Stream(
                _sse_stream(
                    engine,
                    reqs,
                    head=head,
                    choice=_text_choice,
                    obj="text_completion",
                    cid=cid,
                    created=created,
                    model=lm.info.id,
                    include_usage=include_usage,
                    n=data.n,
                    log=log,
                    started=started,
                    lease=lease.hand_to_stream(),
                ),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        texts, finished = await _gather(engine, reqs)
        log_request(*log, 200, finished, started)
        return {
            "id": cid,
            "object": "text_completion",
            "created": created,
            "model": lm.info.id,
            "choices": [
                {
                    "index": i,
                    "text": echo[i] + texts[i],
                    "logprobs": None,
                    "finish_reason": finished[i].reason,
                }
                for i in range(len(reqs))
            ],
            "usage": _usage(finished, data.n),
            "timings": _timings(finished),
        }

    @post("/embeddings", status_code=200)
    async def embeddings(
        self, registry: NamedDependency[Registry], data: JSONBody[EmbeddingRequest]
    ) -> dict[str, Any]:
        started = time.perf_counter()
        texts = [data.input] if isinstance(data.input, str) else data.input
        if not all(isinstance(t, str) for t in texts):
            raise InvalidRequest(
                "input must be a string or a list of strings (token arrays are not supported).",
                param="input",
            )
        ka = keep_alive_value(data.keep_alive)
        lm = await asyncio.to_thread(registry.acquire, data.model)
        try:
            vectors, n_tokens = await asyncio.to_thread(lm.engine.embed, texts)
        finally:
            registry.release(lm, ka)
        if data.dimensions is not None and data.dimensions != len(vectors[0]):
            raise InvalidRequest(
                f"This model's embeddings have {len(vectors[0])} dimensions; it cannot return "
                f"{data.dimensions}.",
                param="dimensions",
            )
        registry.requests.record(
            RequestRecord(
                at=time.time(),
                method="POST",
                path="/v1/embeddings",
                model=lm.info.id,
                status=200,
                prompt_tokens=n_tokens,
                latency_ms=(time.perf_counter() - started) * 1000,
            )
        )
        items = []
        for i, vec in enumerate(vectors):
            emb: Any = vec
            if data.encoding_format == "base64":
                emb = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
            items.append({"object": "embedding", "index": i, "embedding": emb})
        return {
            "object": "list",
            "data": items,
            "model": lm.info.id,
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
        }


async def _gather(
    engine: Engine, reqs: list[GenerationRequest]
) -> tuple[list[str], list[Finished]]:
    texts: list[list[str]] = [[] for _ in reqs]
    finished: list[Finished | None] = [None] * len(reqs)
    async for i, ev in stream(engine, reqs):
        if isinstance(ev, TokenText):
            texts[i].append(ev.text)
        else:
            finished[i] = ev
    done = [f for f in finished if f is not None]
    _check_errors(done)
    return ["".join(t) for t in texts], done


def _chunk(
    cid: str, created: int, model: str, obj: str, choices: list[Any], include_usage: bool
) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": cid,
        "object": obj,
        "created": created,
        "model": model,
        "choices": choices,
    }
    if include_usage:
        chunk["usage"] = None
    return chunk


def _chat_choice(i: int, text: str | None, reason: str | None) -> dict[str, Any]:
    delta = {} if text is None else {"content": text}
    return {"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}


def _text_choice(i: int, text: str | None, reason: str | None) -> dict[str, Any]:
    return {"index": i, "text": text or "", "logprobs": None, "finish_reason": reason}


async def _sse_stream(
    engine: Engine,
    reqs: list[GenerationRequest],
    *,
    head: list[dict[str, Any]],
    choice: Any,
    obj: str,
    cid: str,
    created: int,
    model: str,
    include_usage: bool,
    n: int,
    log: tuple[Registry, str, str],
    started: float,
    lease: _Lease,
) -> AsyncIterator[bytes]:
    """OpenAI's SSE framing: head chunks, one chunk per piece, finish chunks, usage, [DONE]."""
    finished: list[Finished | None] = [None] * len(reqs)
    status = 499  # until the stream ends, the client may still go away
    try:
        async for chunk in _sse_chunks(
            engine, reqs, head, choice, obj, cid, created, model, include_usage, n, finished
        ):
            yield chunk
        status = 503 if any(f and f.reason == "error" for f in finished) else 200
    finally:
        lease.release()
        log_request(*log, status, [f for f in finished if f is not None], started)


async def _sse_chunks(
    engine: Engine,
    reqs: list[GenerationRequest],
    head: list[dict[str, Any]],
    choice: Any,
    obj: str,
    cid: str,
    created: int,
    model: str,
    include_usage: bool,
    n: int,
    finished: list[Finished | None],
) -> AsyncIterator[bytes]:
    for c in head:
        yield _sse(_chunk(cid, created, model, obj, [c], include_usage))
    async for i, ev in stream(engine, reqs):
        if isinstance(ev, TokenText):
            c = choice(i, ev.text, None)
        elif ev.reason == "error":
            yield _sse(
                {
                    "error": {
                        "message": ev.error,
                        "type": "server_error",
                        "param": None,
                        "code": "engine_failure",
                    }
                }
            )
            return
        else:
            finished[i] = ev
            c = choice(i, None, ev.reason)
        yield _sse(_chunk(cid, created, model, obj, [c], include_usage))
    if include_usage:
        done = [f for f in finished if f is not None]
        final = _chunk(cid, created, model, obj, [], False)
        final["usage"] = _usage(done, n)
        final["timings"] = _timings(done)
        yield _sse(final)
    yield b"data: [DONE]\n\n"
