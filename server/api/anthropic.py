"""The Anthropic Messages dialect: POST /v1/messages and /v1/messages/count_tokens.

Requests in (system, content blocks, tools, tool_choice, thinking to a `GenerateRequest`),
events out (Anthropic's `message_start` ... `message_stop` event stream, or one message), errors
out (`{"type": "error", "error": {"type", "message"}}`, by this controller's handlers). The
request itself runs in `server.pipeline`; the `x-api-key` header is the app's key guard's.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import msgspec
from litestar import Controller, Request, Response, post
from litestar.di import NamedDependency
from litestar.params import JSONBody
from msgspec import Meta

from server.api.errors import handlers
from server.api.schemas import PositiveInt, Probability, TopK
from server.api.sse import EventStream
from server.chat_output import ChatOutput
from server.errors import ContextOverflow, InvalidRequest, LmxError
from server.pipeline import (
    CallDelta,
    CallEnd,
    CallStart,
    Delta,
    Done,
    GenerateRequest,
    Reasoning,
    Run,
    Sampling,
)
from server.runtime import Runtime
from server.toolcalls import (
    ToolChoice,
    ToolSpec,
    parse_anthropic_tool_choice,
    parse_anthropic_tools,
)

# HTTP status -> Anthropic's error type.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def anthropic_shape(
    status: int, message: str, type_: str | None, code: str | None, param: str | None
) -> Any:
    return {
        "type": "error",
        "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": message},
    }


def anthropic_phrase(exc: LmxError) -> str | None:
    """Anthropic's words for a prompt over the context, which Claude Code reads to compact the
    conversation: `prompt is too long: N tokens > M maximum`."""
    if isinstance(exc, ContextOverflow):
        return (
            f"prompt is too long: {exc.prompt_tokens} tokens > {exc.limit} maximum. "
            "Shorten the conversation, or load the model with a larger context."
        )
    return None


ANTHROPIC_ERRORS = handlers(anthropic_shape, anthropic_phrase)


class InputMessage(msgspec.Struct, kw_only=True):
    """One turn: a string, or a list of content blocks (text, tool_use, tool_result...).
    `system` turns (text only) are instructions mid-conversation, as Claude Code sends them."""

    role: Literal["user", "assistant", "system"]
    content: str | list[dict[str, Any]]


class PromptFields(msgspec.Struct, kw_only=True):
    """What shapes the prompt (shared with count_tokens)."""

    model: str
    messages: Annotated[list[InputMessage], Meta(min_length=1)]
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None


class MessagesRequest(PromptFields, kw_only=True):
    """POST /v1/messages."""

    max_tokens: PositiveInt
    stop_sequences: Annotated[list[str], Meta(max_length=16)] | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    top_p: Probability | None = None
    top_k: TopK | None = None
    stream: bool = False
    metadata: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = None  # `format`: a JSON schema the reply follows


def _output_format(config: dict[str, Any] | None) -> dict[str, Any]:
    """Structured output (`output_config.format`) as the pipeline's JSON mode."""
    fmt = (config or {}).get("format")
    if fmt is None:
        return {}
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        raise InvalidRequest(
            "output_config.format.type: Input should be 'json_schema'",
            param="output_config.format",
        )
    schema = fmt.get("schema")
    if not isinstance(schema, dict):
        raise InvalidRequest(
            "output_config.format.schema: Field required", param="output_config.format.schema"
        )
    return {"json_mode": True, "json_schema": schema}


def _text_blocks(value: Any, where: str) -> str:
    """A string, or a list of text blocks, as text."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise InvalidRequest(f"{where}: Input should be a valid string or list", param=where)
    parts = []
    for k, b in enumerate(value):
        if not isinstance(b, dict) or b.get("type") != "text" or not isinstance(b.get("text"), str):
            kind = b.get("type") if isinstance(b, dict) else type(b).__name__
            raise InvalidRequest(
                f"{where}.{k}: only text blocks are supported here, not {kind!r}",
                param=f"{where}.{k}",
            )
        parts.append(b["text"])
    return "\n\n".join(parts)


def _assistant(i: int, blocks: list[dict[str, Any]]) -> dict[str, Any]:
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for k, b in enumerate(blocks):
        where = f"messages.{i}.content.{k}"
        kind = b.get("type")
        if kind == "text":
            texts.append(_text_blocks([b], where))
        elif kind == "tool_use":
            cid, name, args = b.get("id"), b.get("name"), b.get("input")
            if not isinstance(cid, str) or not cid or not isinstance(name, str) or not name:
                raise InvalidRequest(f"{where}: tool_use needs an id and a name", param=where)
            if not isinstance(args, dict):
                raise InvalidRequest(
                    f"{where}.input: Input should be a valid dictionary", param=f"{where}.input"
                )
            calls.append({"id": cid, "function": {"name": name, "arguments": args}})
        elif kind in ("thinking", "redacted_thinking"):
            continue  # the model's earlier thinking is not shown to it again
        else:
            raise InvalidRequest(
                f"{where}.type: unsupported content block type {kind!r} in an assistant turn",
                param=f"{where}.type",
            )
    msg: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
    if calls:
        msg["tool_calls"] = calls
    return msg


def _user(i: int, blocks: list[dict[str, Any]], open_calls: dict[str, str]) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    texts: list[str] = []
    for k, b in enumerate(blocks):
        where = f"messages.{i}.content.{k}"
        kind = b.get("type")
        if kind == "text":
            texts.append(_text_blocks([b], where))
        elif kind == "tool_result":
            tid = b.get("tool_use_id")
            if not isinstance(tid, str) or not tid:
                raise InvalidRequest(
                    f"{where}.tool_use_id: Field required", param=f"{where}.tool_use_id"
                )
            if tid not in open_calls:
                raise InvalidRequest(
                    f"{where}: unexpected `tool_use_id` found in `tool_result` blocks: {tid}. "
                    "Each `tool_result` block must have a corresponding `tool_use` block in the "
                    "previous message.",
                    param=f"{where}.tool_use_id",
                )
            content = _text_blocks(b.get("content", ""), f"{where}.content")
            if b.get("is_error"):
                content = f"Error: {content}"
            results.append(
                {"role": "tool", "tool_call_id": tid, "name": open_calls[tid], "content": content}
            )
        elif kind in ("image", "document"):
            raise InvalidRequest(f"{where}: this model does not accept {kind}s", param=where)
        else:
            raise InvalidRequest(
                f"{where}.type: unsupported content block type {kind!r} in a user turn",
                param=f"{where}.type",
            )
    if texts:
        results.append({"role": "user", "content": "\n\n".join(texts)})
    return results


# Claude Code opens its system prompt with `x-anthropic-billing-header: cc_version=...;
# cc_entrypoint=cli; cch=a5145;`: the `cch` stamp changes on every request, so no prefix cache
# would get past it. It means nothing to a local model; it is written as one fixed value (as
# llama.cpp's server does), and the prompt is computed once.
_BILLING_STAMP = re.compile(r"\A(x-anthropic-billing-header:[^\n]*?\bcch=)[0-9A-Za-z]+;")


def normalize_billing_header(text: str) -> str:
    return _BILLING_STAMP.sub(r"\g<1>00000;", text, count=1)


def _system_text(system: str | list[dict[str, Any]]) -> str:
    if isinstance(system, list):
        system = [
            {**b, "text": normalize_billing_header(b["text"])}
            if isinstance(b, dict) and isinstance(b.get("text"), str)
            else b
            for b in system
        ]
    else:
        system = normalize_billing_header(system)
    return _text_blocks(system, "system")


def messages_of(body: PromptFields) -> list[dict[str, Any]]:
    """Anthropic turns as the pipeline's messages: `tool_use` blocks become an assistant's
    tool calls, `tool_result` blocks tool results (each checked against the calls of the turn
    before it), `system` turns system messages in place."""
    out: list[dict[str, Any]] = []
    if body.system:
        out.append({"role": "system", "content": _system_text(body.system)})
    open_calls: dict[str, str] = {}
    for i, m in enumerate(body.messages):
        blocks = [{"type": "text", "text": m.content}] if isinstance(m.content, str) else m.content
        if not all(isinstance(b, dict) for b in blocks):
            raise InvalidRequest(f"messages.{i}.content: blocks must be objects", param="messages")
        if m.role == "system":
            # Kept where it stands (a chat template renders a system turn there, as for
            # /v1/chat/completions); the calls of the turn before stay open for results.
            out.append({"role": "system", "content": _text_blocks(blocks, f"messages.{i}.content")})
        elif m.role == "assistant":
            msg = _assistant(i, blocks)
            open_calls = {c["id"]: c["function"]["name"] for c in msg.get("tool_calls", [])}
            out.append(msg)
        else:
            out.extend(_user(i, blocks, open_calls))
            open_calls = {}
    return out


def _think(thinking: dict[str, Any] | None) -> bool | None:
    if thinking is None:
        return None
    kind = thinking.get("type")
    if kind not in ("enabled", "disabled", "adaptive", "between_tools"):
        raise InvalidRequest(
            "thinking.type: Input should be 'enabled', 'disabled', 'adaptive' or 'between_tools'",
            param="thinking.type",
        )
    return bool(kind != "disabled")


def _tools(body: PromptFields) -> tuple[list[ToolSpec], ToolChoice, bool]:
    tools = parse_anthropic_tools(body.tools)
    choice, parallel = parse_anthropic_tool_choice(body.tool_choice, tools)
    return tools, choice, parallel


def request_of(body: PromptFields, **more: Any) -> GenerateRequest:
    """The pipeline request for an Anthropic body."""
    tools, choice, parallel = _tools(body)
    return GenerateRequest(
        model=body.model,
        messages=messages_of(body),
        tools=tools,
        tool_choice=choice,
        parallel_tool_calls=parallel,
        think=_think(body.thinking),
        label="anthropic",
        **more,
    )


def tool_use_id(call_id: str) -> str:
    """Anthropic-style ids for the calls the parsers name `call_...`."""
    return "toolu_" + call_id.removeprefix("call_")


def stop_reason(done: Done) -> tuple[str, str | None]:
    """Anthropic's stop_reason and stop_sequence for a finished choice."""
    if done.reason == "tool_calls":
        return "tool_use", None
    if done.reason == "length":
        return "max_tokens", None
    if done.finished.stop_sequence is not None:
        return "stop_sequence", done.finished.stop_sequence
    return "end_turn", None


def _usage(run: Run) -> dict[str, Any]:
    u = run.usage()
    return {
        "input_tokens": u.prompt_tokens - u.cached_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": u.cached_tokens,
        "output_tokens": u.completion_tokens,
    }


def content_of(out: ChatOutput, show_thinking: bool) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    if out.reasoning and show_thinking:
        blocks.append({"type": "thinking", "thinking": out.reasoning, "signature": ""})
    if out.content:
        blocks.append({"type": "text", "text": out.content})
    for c in out.tool_calls:
        blocks.append(
            {
                "type": "tool_use",
                "id": tool_use_id(c.id),
                "name": c.name,
                "input": json.loads(c.arguments) if c.arguments else {},
            }
        )
    return blocks


class AnthropicController(Controller):
    """Anthropic's Messages API over the generation pipeline."""

    path = "/v1/messages"
    tags = ["anthropic"]  # noqa: RUF012
    exception_handlers = ANTHROPIC_ERRORS

    @post("/", status_code=200)
    async def create(
        self,
        rt: NamedDependency[Runtime],
        data: JSONBody[MessagesRequest],
        request: Request[Any, Any, Any],
    ) -> Response[Any]:
        req = request_of(
            data,
            # Claude Code's subagents name themselves; each keeps its own slot and cache.
            affinity=request.headers.get("x-claude-code-agent-id") or None,
            max_tokens=data.max_tokens,
            sampling=Sampling(temperature=data.temperature, top_p=data.top_p, top_k=data.top_k),
            stop=list(data.stop_sequences or []),
            path="/v1/messages",
            **_output_format(data.output_config),
        )
        show_thinking = req.think is not False
        run = await rt.service.start(req)
        mid = f"msg_{uuid.uuid4().hex[:24]}"
        if data.stream:
            return EventStream(_stream(run, mid, show_thinking))
        result = await run.result()
        if (failure := run.failure) is not None:
            raise failure
        reason, sequence = stop_reason(
            Done(0, result.finished[0], len(result.outputs[0].tool_calls))
        )
        return Response(
            {
                "id": mid,
                "type": "message",
                "role": "assistant",
                "model": run.model_id,
                "content": content_of(result.outputs[0], show_thinking),
                "stop_reason": reason,
                "stop_sequence": sequence,
                "usage": _usage(run),
            }
        )

    @post("/count_tokens", status_code=200)
    async def count_tokens(
        self, rt: NamedDependency[Runtime], data: JSONBody[PromptFields]
    ) -> dict[str, Any]:
        _, prompt = await rt.service.preview(request_of(data, path="/v1/messages/count_tokens"))
        return {"input_tokens": len(prompt.tokens[0])}


def _event(kind: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"event": kind, "data": msgspec.json.encode({"type": kind, **body}).decode()}


async def _stream(run: Run, mid: str, show_thinking: bool) -> AsyncIterator[dict[str, Any]]:
    """Anthropic's event sequence: message_start, a content block per text / thinking / tool
    call (start, deltas, stop), message_delta with the stop reason and usage, message_stop."""
    index = -1
    kind: str | None = None  # the open block's type

    def open_block(block: dict[str, Any]) -> list[dict[str, Any]]:
        nonlocal index, kind
        out = close_block()
        index += 1
        kind = block["type"]
        out.append(_event("content_block_start", {"index": index, "content_block": block}))
        return out

    def close_block() -> list[dict[str, Any]]:
        nonlocal kind
        if kind is None:
            return []
        kind = None
        return [_event("content_block_stop", {"index": index})]

    def delta(body: dict[str, Any]) -> dict[str, Any]:
        return _event("content_block_delta", {"index": index, "delta": body})

    try:
        yield _event(
            "message_start",
            {
                "message": {
                    "id": mid,
                    "type": "message",
                    "role": "assistant",
                    "model": run.model_id,
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {"input_tokens": run.prompt_tokens, "output_tokens": 0},
                }
            },
        )
        async for ev in run.events():
            if isinstance(ev, Delta):
                if kind != "text":
                    for e in open_block({"type": "text", "text": ""}):
                        yield e
                yield delta({"type": "text_delta", "text": ev.text})
            elif isinstance(ev, Reasoning):
                if not show_thinking:
                    continue
                if kind != "thinking":
                    for e in open_block({"type": "thinking", "thinking": "", "signature": ""}):
                        yield e
                yield delta({"type": "thinking_delta", "thinking": ev.text})
            elif isinstance(ev, CallStart):
                block = {"type": "tool_use", "id": tool_use_id(ev.id), "name": ev.name, "input": {}}
                for e in open_block(block):
                    yield e
            elif isinstance(ev, CallDelta):
                yield delta({"type": "input_json_delta", "partial_json": ev.arguments})
            elif isinstance(ev, CallEnd):
                for e in close_block():
                    yield e
            elif isinstance(ev, Done):
                if ev.finished.reason == "error":
                    yield _event(
                        "error",
                        {
                            "error": {
                                "type": "api_error",
                                "message": ev.finished.error or "generation failed",
                            }
                        },
                    )
                    return
                for e in close_block():
                    yield e
                reason, sequence = stop_reason(ev)
                yield _event(
                    "message_delta",
                    {
                        "delta": {"stop_reason": reason, "stop_sequence": sequence},
                        "usage": {"output_tokens": ev.finished.completion_tokens},
                    },
                )
        yield _event("message_stop", {})
    finally:
        await run.aclose()
