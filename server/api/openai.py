"""The OpenAI dialect: /v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings.

Requests in (OpenAI fields to a `GenerateRequest`), events out (SSE chunks or one response),
errors out (OpenAI error objects, by this router's exception handlers). The request itself
runs in `server.pipeline`.
"""

from __future__ import annotations

import base64
import struct
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

import msgspec
from litestar import Controller, Response, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, FromQuery, HeaderParameter, JSONBody
from litestar.types import ExceptionHandlersMap

from server.api.errors import OPENAI_ERRORS
from server.api.model_cards import anthropic_model, anthropic_page, model_card, openai_cards
from server.api.schemas import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    EmbeddingRequest,
    ResponseFormat,
    SamplingFields,
)
from server.api.sse import EventStream
from server.chat_output import ChatOutput
from server.engines.base import Finished
from server.errors import InvalidRequest
from server.pipeline import (
    CallDelta,
    CallStart,
    Delta,
    Done,
    GenerateRequest,
    Reasoning,
    Run,
    RunEvent,
    Sampling,
)
from server.runtime import Runtime
from server.settings import parse_duration
from server.toolcalls import parse_tool_choice, parse_tools

# Sent by Anthropic's clients: /v1/models answers them in Anthropic's list shape.
AnthropicVersion = Annotated[str | None, HeaderParameter(name="anthropic-version")]


def _errors_by_version_header() -> ExceptionHandlersMap:
    """OpenAI's error shape, or Anthropic's for a client that sends `anthropic-version` (the
    model list answers both dialects)."""

    def pick(kind: Any) -> Any:
        def handle(request: Any, exc: Any) -> Any:
            from server.api.anthropic import ANTHROPIC_ERRORS

            anthropic = "anthropic-version" in request.headers
            return (ANTHROPIC_ERRORS if anthropic else OPENAI_ERRORS)[kind](request, exc)

        return handle

    return {kind: pick(kind) for kind in OPENAI_ERRORS}


def keep_alive_value(value: str | int | float | None) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as e:
        raise InvalidRequest(str(e), param="keep_alive") from e


def _tool_calls_of(calls: list[dict[str, Any]], i: int) -> list[dict[str, Any]]:
    """An assistant message's `tool_calls`, checked: each has an id, a name and arguments."""
    out = []
    for k, call in enumerate(calls):
        where = f"messages[{i}].tool_calls[{k}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise InvalidRequest(
                f"Missing required parameter: '{where}.function.name'.", param=where
            )
        cid = call.get("id")
        if not isinstance(cid, str) or not cid:
            raise InvalidRequest(f"Missing required parameter: '{where}.id'.", param=f"{where}.id")
        args = fn.get("arguments", "")
        if not isinstance(args, (str, dict)):
            raise InvalidRequest(
                f"'{where}.function.arguments' must be a string of JSON.",
                param=f"{where}.function.arguments",
            )
        out.append(
            {"id": cid, "type": "function", "function": {"name": fn["name"], "arguments": args}}
        )
    return out


def messages_of(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """OpenAI messages as the pipeline's plain dicts (text parts joined; tool calls and tool
    results checked against each other)."""
    out = []
    call_ids: set[str] = set()
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
        if m.tool_calls:
            if m.role != "assistant":
                raise InvalidRequest(
                    f"messages[{i}]: only assistant messages may have tool_calls.",
                    param=f"messages[{i}].tool_calls",
                )
            msg["tool_calls"] = _tool_calls_of(m.tool_calls, i)
            call_ids.update(c["id"] for c in msg["tool_calls"])
        if m.role == "tool":
            if not m.tool_call_id:
                raise InvalidRequest(
                    f"Missing required parameter: 'messages[{i}].tool_call_id'.",
                    param=f"messages[{i}].tool_call_id",
                )
            if m.tool_call_id not in call_ids:
                raise InvalidRequest(
                    f"Invalid parameter: messages[{i}] with role 'tool' must answer a tool call "
                    f"of an earlier assistant message; no call has the id '{m.tool_call_id}'.",
                    param=f"messages[{i}].tool_call_id",
                )
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out


def chat_message(out: ChatOutput) -> dict[str, Any]:
    """A parsed reply as an OpenAI assistant message (reasoning under both names engines
    use: `reasoning_content` and `reasoning`)."""
    msg: dict[str, Any] = {
        "role": "assistant",
        "content": out.content if out.content or not out.tool_calls else None,
    }
    if out.reasoning:
        msg["reasoning_content"] = msg["reasoning"] = out.reasoning
    if out.tool_calls:
        msg["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.name, "arguments": c.arguments},
            }
            for c in out.tool_calls
        ]
    return msg


def sampling_of(body: SamplingFields) -> Sampling:
    return Sampling(
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        min_p=body.min_p,
        repeat_penalty=body.repeat_penalty,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        seed=body.seed,
    )


def _format(rf: ResponseFormat | None) -> tuple[bool, dict[str, Any] | None]:
    if rf is None or rf.type == "text":
        return False, None
    if rf.type == "json_object":
        return True, rf.schema
    if rf.json_schema is None or rf.json_schema.schema is None:
        raise InvalidRequest(
            "response_format json_schema needs json_schema.schema.", param="response_format"
        )
    return True, rf.json_schema.schema


def _common(body: SamplingFields, path: str) -> dict[str, Any]:
    if body.logprobs:
        raise InvalidRequest("logprobs are not supported.", param="logprobs")
    try:
        bias = {int(k): v for k, v in (body.logit_bias or {}).items()}
    except ValueError as e:
        raise InvalidRequest("logit_bias keys must be token ids.", param="logit_bias") from e
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return {
        "sampling": sampling_of(body),
        "stop": stop,
        "n": body.n,
        "logit_bias": bias,
        "ignore_eos": body.ignore_eos,
        "keep_alive": keep_alive_value(body.keep_alive),
        "label": "openai",
        "path": path,
    }


def usage_of(run: Run) -> dict[str, Any]:
    u = run.usage()
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    }


def timings_of(finished: list[Finished | None]) -> list[dict[str, Any]]:
    return [f.timings.as_dict() for f in finished if f is not None and f.timings]


def _error_chunk(message: str) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": "server_error",
            "param": None,
            "code": "engine_failure",
        }
    }


class OpenAIController(Controller):
    """OpenAI's wire format over the generation pipeline."""

    path = "/v1"
    tags = ["openai"]  # noqa: RUF012
    exception_handlers = OPENAI_ERRORS

    @get("/models", exception_handlers=_errors_by_version_header())
    async def list_models(
        self,
        rt: NamedDependency[Runtime],
        anthropic_version: AnthropicVersion = None,
        limit: FromQuery[int | None] = None,
        after_id: FromQuery[str | None] = None,
        before_id: FromQuery[str | None] = None,
    ) -> dict[str, Any]:
        cards = openai_cards(rt)
        if anthropic_version is not None:  # Claude Code, the Anthropic SDKs
            return anthropic_page(cards, limit, after_id, before_id)
        return {"object": "list", "data": cards}

    @get("/models/{model_id:path}", exception_handlers=_errors_by_version_header())
    async def get_model(
        self,
        rt: NamedDependency[Runtime],
        model_id: FromPath[str],
        anthropic_version: AnthropicVersion = None,
    ) -> dict[str, Any]:
        card = model_card(rt.catalog.resolve(model_id.lstrip("/")), rt)
        return anthropic_model(card) if anthropic_version is not None else card

    @post("/chat/completions", status_code=200)
    async def chat_completions(
        self, rt: NamedDependency[Runtime], data: JSONBody[ChatCompletionRequest]
    ) -> Response[Any]:
        tools = parse_tools(data.tools)
        choice = parse_tool_choice(data.tool_choice, tools)
        json_mode, schema = _format(data.response_format)
        req = GenerateRequest(
            model=data.model,
            messages=messages_of(data.messages),
            max_tokens=data.max_completion_tokens or data.max_tokens,
            json_mode=json_mode,
            json_schema=schema,
            grammar=data.grammar,
            tools=tools,
            tool_choice=choice,
            parallel_tool_calls=data.parallel_tool_calls,
            affinity=data.prompt_cache_key,
            **_common(data, "/v1/chat/completions"),
        )
        run = await rt.service.start(req)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if data.stream:
            include_usage = bool(data.stream_options and data.stream_options.include_usage)
            return EventStream(_chat_stream(run, cid, created, include_usage))
        result = await run.result()
        if (failure := run.failure) is not None:
            raise failure
        return Response(
            {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": run.model_id,
                "choices": [
                    {
                        "index": i,
                        "message": chat_message(result.outputs[i]),
                        "logprobs": None,
                        "finish_reason": result.reasons[i],
                    }
                    for i in range(run.choices)
                ],
                "usage": usage_of(run),
                "timings": timings_of(list(run.finished)),
            }
        )

    @post("/completions", status_code=200)
    async def completions(
        self, rt: NamedDependency[Runtime], data: JSONBody[CompletionRequest]
    ) -> Response[Any]:
        prompts = [data.prompt] if isinstance(data.prompt, str) else data.prompt
        if not all(isinstance(p, str) for p in prompts):
            raise InvalidRequest("prompt must be a string or a list of strings.", param="prompt")
        json_mode, schema = _format(data.response_format)
        req = GenerateRequest(
            model=data.model,
            prompts=list(prompts),
            max_tokens=data.max_tokens,
            json_mode=json_mode,
            json_schema=schema,
            **_common(data, "/v1/completions"),
        )
        run = await rt.service.start(req)
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        echo = [prompts[i // data.n] if data.echo else "" for i in range(run.choices)]
        if data.stream:
            include_usage = bool(data.stream_options and data.stream_options.include_usage)
            return EventStream(_text_stream(run, cid, created, include_usage, echo))
        result = await run.result()
        if (failure := run.failure) is not None:
            raise failure
        return Response(
            {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": run.model_id,
                "choices": [
                    {
                        "index": i,
                        "text": echo[i] + result.texts[i],
                        "logprobs": None,
                        "finish_reason": result.finished[i].reason,
                    }
                    for i in range(run.choices)
                ],
                "usage": usage_of(run),
                "timings": timings_of(list(run.finished)),
            }
        )

    @post("/embeddings", status_code=200)
    async def embeddings(
        self, rt: NamedDependency[Runtime], data: JSONBody[EmbeddingRequest]
    ) -> dict[str, Any]:
        texts = [data.input] if isinstance(data.input, str) else data.input
        if not all(isinstance(t, str) for t in texts):
            raise InvalidRequest(
                "input must be a string or a list of strings (token arrays are not supported).",
                param="input",
            )
        model, vectors, n_tokens = await rt.service.embed(
            data.model,
            list(texts),
            keep_alive=keep_alive_value(data.keep_alive),
            label="openai",
            path="/v1/embeddings",
        )
        if data.dimensions is not None and data.dimensions != len(vectors[0]):
            raise InvalidRequest(
                f"This model's embeddings have {len(vectors[0])} dimensions; it cannot return "
                f"{data.dimensions}.",
                param="dimensions",
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
            "model": model,
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
        }


def _encode(obj: Any) -> str:
    return msgspec.json.encode(obj).decode()


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


async def _chat_stream(run: Run, cid: str, created: int, include_usage: bool) -> AsyncIterator[str]:
    """OpenAI's chat chunks: a role chunk per choice, content deltas, finish chunks, usage."""

    def chunk(choice: dict[str, Any]) -> str:
        return _encode(
            _chunk(cid, created, run.model_id, "chat.completion.chunk", [choice], include_usage)
        )

    try:
        for i in range(run.choices):
            yield chunk(
                {
                    "index": i,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            )
        async for ev in run.events():
            if isinstance(ev, Done):
                if ev.finished.reason == "error":
                    yield _encode(_error_chunk(ev.finished.error or "generation failed"))
                    return
                yield chunk(
                    {"index": ev.index, "delta": {}, "logprobs": None, "finish_reason": ev.reason}
                )
                continue
            delta = chat_delta(ev)
            if delta is not None:
                yield chunk(
                    {"index": ev.index, "delta": delta, "logprobs": None, "finish_reason": None}
                )
        if include_usage:
            final = _chunk(cid, created, run.model_id, "chat.completion.chunk", [], False)
            final["usage"] = usage_of(run)
            final["timings"] = timings_of(list(run.finished))
            yield _encode(final)
        yield "[DONE]"
    finally:
        await run.aclose()


def chat_delta(ev: RunEvent) -> dict[str, Any] | None:
    """A chunk's `delta` for one pipeline event (None: the event sends nothing). A call's id
    and name come first, then its arguments in fragments, each with the call's index."""
    if isinstance(ev, Delta):
        return {"content": ev.text}
    if isinstance(ev, Reasoning):
        return {"reasoning_content": ev.text, "reasoning": ev.text}
    if isinstance(ev, CallStart):
        call = {"name": ev.name, "arguments": ""}
        return {
            "tool_calls": [{"index": ev.call, "id": ev.id, "type": "function", "function": call}]
        }
    if isinstance(ev, CallDelta):
        return {"tool_calls": [{"index": ev.call, "function": {"arguments": ev.arguments}}]}
    return None


async def _text_stream(
    run: Run, cid: str, created: int, include_usage: bool, echo: list[str]
) -> AsyncIterator[str]:
    """OpenAI's text-completion chunks."""

    def chunk(i: int, text: str, reason: str | None) -> str:
        choice = {"index": i, "text": text, "logprobs": None, "finish_reason": reason}
        return _encode(
            _chunk(cid, created, run.model_id, "text_completion", [choice], include_usage)
        )

    try:
        for i, t in enumerate(echo):
            if t:
                yield chunk(i, t, None)
        async for ev in run.events():
            if isinstance(ev, Delta):
                yield chunk(ev.index, ev.text, None)
            elif isinstance(ev, Done):
                if ev.finished.reason == "error":
                    yield _encode(_error_chunk(ev.finished.error or "generation failed"))
                    return
                yield chunk(ev.index, "", ev.finished.reason)
        if include_usage:
            final = _chunk(cid, created, run.model_id, "text_completion", [], False)
            final["usage"] = usage_of(run)
            final["timings"] = timings_of(list(run.finished))
            yield _encode(final)
        yield "[DONE]"
    finally:
        await run.aclose()
