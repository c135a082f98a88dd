"""The OpenAI Responses dialect: POST /v1/responses, GET and DELETE /v1/responses/{id}.

Requests in (`input` string or items, `instructions`, function tools, `text.format`,
`previous_response_id`) to a `GenerateRequest`; events out (the `response.*` event stream, or
one response object); errors out as OpenAI error objects. The request runs in
`server.pipeline`. Conversations continue through `previous_response_id` from a bounded
in-memory store (`ResponseStore`): a response it no longer holds is a 404 naming the id.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import msgspec
from litestar import Controller, Request, Response, delete, get, post
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody

from server.api.errors import OPENAI_ERRORS
from server.api.openai import keep_alive_value
from server.api.responses_tools import (
    HOSTED_CALL_ITEMS,
    ResponsesTools,
    custom_arguments,
    echo_tools,
    parse_tools,
)
from server.api.schemas import PositiveInt, Probability, Temperature
from server.api.sse import EventStream
from server.chat_output import ChatOutput, ToolCall
from server.errors import InvalidRequest, NotFound
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
from server.toolcalls import RESPONSES_NAMED_CHOICE, parse_tool_choice

MAX_STORED = 1000
MAX_STORED_BYTES = 64 * 1024 * 1024


@dataclass
class StoredResponse:
    """A finished response and the conversation that continues from it."""

    response: dict[str, Any]
    messages: list[dict[str, Any]]  # every turn so far, its own reply included
    size: int


class ResponseStore:
    """Responses kept for `previous_response_id` and GET: bounded in count and in bytes,
    the least recently used dropped first. In memory only: a restart forgets them."""

    def __init__(self, max_count: int = MAX_STORED, max_bytes: int = MAX_STORED_BYTES) -> None:
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, rid: str, response: dict[str, Any], messages: list[dict[str, Any]]) -> None:
        size = len(msgspec.json.encode([response, messages]))
        with self._lock:
            old = self._items.pop(rid, None)
            if old is not None:
                self.bytes -= old.size
            if size > self.max_bytes:
                return  # larger than the whole store: kept nowhere
            self._items[rid] = StoredResponse(response, messages, size)
            self.bytes += size
            while len(self._items) > self.max_count or self.bytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self.bytes -= dropped.size

    def get(self, rid: str) -> StoredResponse | None:
        with self._lock:
            item = self._items.get(rid)
            if item is not None:
                self._items.move_to_end(rid)
            return item

    def delete(self, rid: str) -> bool:
        with self._lock:
            item = self._items.pop(rid, None)
            if item is not None:
                self.bytes -= item.size
            return item is not None


def store_of(state: State) -> ResponseStore:
    """The app's response store (one per app, made on first use)."""
    store = state.get("responses")
    if store is None:
        store = state["responses"] = ResponseStore()
    return store


def not_found(rid: str, param: str | None = None) -> NotFound:
    return NotFound(
        f"Response with id '{rid}' not found. lmx keeps the last {MAX_STORED} responses in "
        "memory (fewer when they are large); it may have been deleted, evicted, or stored by "
        "a server that has since restarted. Send the whole conversation in 'input' instead.",
        param=param,
    )


class ResponsesRequest(msgspec.Struct, kw_only=True):
    """POST /v1/responses (fields lmx has no use for, such as `include`, are ignored)."""

    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: Probability | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    stream: bool = False
    previous_response_id: str | None = None
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    user: str | None = None
    keep_alive: str | int | float | None = None  # lmx extension: as Ollama's keep_alive
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    # Echoed as given (the spec's response object carries them); lmx acts on none of them.
    max_tool_calls: int | None = None
    top_logprobs: int | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None


def _part_text(content: Any, where: str) -> str:
    """A message's content: a string, or input_text / output_text parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(f"Invalid '{where}': expected a string or a list.", param=where)
    parts = []
    for k, p in enumerate(content):
        kind = p.get("type") if isinstance(p, dict) else None
        if kind in ("input_text", "output_text", "text") and isinstance(p.get("text"), str):
            parts.append(p["text"])
        else:
            raise InvalidRequest(
                f"Invalid '{where}[{k}]': content of type {kind!r} is not supported by this "
                "model; only text is.",
                param=f"{where}[{k}]",
            )
    return "".join(parts)


def input_messages(
    raw: str | list[dict[str, Any]], history: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Input items after `history` (a previous response's conversation), as the pipeline's
    messages: consecutive function_call items join one assistant turn, and each
    function_call_output must answer a call made in the conversation."""
    if isinstance(raw, str):
        return [*history, {"role": "user", "content": raw}]
    out = [dict(m) for m in history]
    calls = {c["id"]: c for m in out for c in m.get("tool_calls") or []}
    for i, item in enumerate(raw):
        where = f"input[{i}]"
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise InvalidRequest(
                    f"Invalid '{where}.role': {role!r}. Supported values are: 'user', "
                    "'assistant', 'system' and 'developer'.",
                    param=f"{where}.role",
                )
            out.append(
                {
                    "role": "system" if role == "developer" else role,
                    "content": _part_text(item.get("content", ""), f"{where}.content"),
                }
            )
        elif kind in ("function_call", "custom_tool_call"):
            cid, name = item.get("call_id"), item.get("name")
            if kind == "custom_tool_call":
                text = item.get("input", "")
                args: Any = custom_arguments(text) if isinstance(text, str) else text
            else:
                args = item.get("arguments", "")
            if not isinstance(cid, str) or not cid or not isinstance(name, str) or not name:
                raise InvalidRequest(
                    f"Missing required parameter: '{where}.call_id' and '{where}.name'.",
                    param=where,
                )
            if not isinstance(args, str):
                raise InvalidRequest(
                    f"Invalid '{where}.arguments': expected a string of JSON.",
                    param=f"{where}.arguments",
                )
            call = {"id": cid, "type": "function", "function": {"name": name, "arguments": args}}
            calls[cid] = call
            last = out[-1] if out else None
            if last is not None and last.get("role") == "assistant" and "tool_calls" in last:
                last["tool_calls"] = [*last["tool_calls"], call]
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind in ("function_call_output", "custom_tool_call_output"):
            cid = item.get("call_id")
            if not isinstance(cid, str) or cid not in calls:
                raise InvalidRequest(
                    f"No tool call found for function call output with call_id {cid!r} "
                    f"('{where}'): send the function_call item too, or continue from the "
                    "response that made it with previous_response_id.",
                    param=f"{where}.call_id",
                )
            output = item.get("output", "")
            text = output if isinstance(output, str) else _part_text(output, f"{where}.output")
            out.append(
                {
                    "role": "tool",
                    "tool_call_id": cid,
                    "name": calls[cid]["function"]["name"],
                    "content": text,
                }
            )
        elif kind == "reasoning" or kind in HOSTED_CALL_ITEMS:
            continue  # earlier thinking (and what a hosted tool did) is not shown again
        else:
            raise InvalidRequest(
                f"Invalid '{where}.type': {kind!r} is not supported; lmx takes message, "
                "function_call, function_call_output, custom_tool_call, custom_tool_call_output "
                "and reasoning items.",
                param=f"{where}.type",
            )
    if not any(m.get("role") in ("user", "tool", "assistant") for m in out):
        raise InvalidRequest("input has no message.", param="input")
    return out


def _text_format(text: dict[str, Any] | None) -> tuple[bool, dict[str, Any] | None, Any]:
    """(json mode, schema, the format to echo) from `text.format`."""
    fmt = (text or {}).get("format") or {"type": "text"}
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return False, None, fmt
    if kind == "json_object":
        return True, None, fmt
    if kind == "json_schema":
        schema = fmt.get("schema")
        if not isinstance(schema, dict):
            raise InvalidRequest(
                "Missing required parameter: 'text.format.schema'.", param="text.format.schema"
            )
        return True, schema, fmt
    raise InvalidRequest(
        f"Invalid value for 'text.format.type': {kind!r}. Supported values are: 'text', "
        "'json_object' and 'json_schema'.",
        param="text.format.type",
    )


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class _Builder:
    """The response object and its output items, as they grow."""

    def __init__(
        self, body: ResponsesRequest, choice: Any, fmt: Any, run: Run, tools: ResponsesTools
    ) -> None:
        self.id = _new_id("resp")
        self.created = int(time.time())
        self.body = body
        self.choice = choice
        self.fmt = fmt
        self.model = run.model_id
        self.tools = tools
        # What the reply was sampled with: the request's values, else its preset's or the
        # engine's defaults (the spec's response says the values used, never null).
        self.sampling = run.request.sampling.params()
        self.output: list[dict[str, Any]] = []

    def response(self, status: str, run: Run | None = None, **extra: Any) -> dict[str, Any]:
        b = self.body
        usage = None
        if run is not None and run.done:
            u = run.usage()
            usage = {
                "input_tokens": u.prompt_tokens,
                "input_tokens_details": {"cached_tokens": u.cached_tokens},
                "output_tokens": u.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": u.total_tokens,
            }
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": None,
            "incomplete_details": None,
            "instructions": b.instructions,
            "max_output_tokens": b.max_output_tokens,
            "model": self.model,
            "output": list(self.output),
            "parallel_tool_calls": b.parallel_tool_calls is not False,
            "previous_response_id": b.previous_response_id,
            "reasoning": {"effort": None, "summary": None},
            "store": b.store is not False,
            "temperature": self.sampling.temperature,
            "text": {"format": self.fmt},
            "tool_choice": self.choice,
            "tools": echo_tools(b.tools),
            "top_p": self.sampling.top_p,
            "presence_penalty": self.sampling.presence_penalty,
            "frequency_penalty": self.sampling.frequency_penalty,
            "top_logprobs": b.top_logprobs or 0,
            "max_tool_calls": b.max_tool_calls,
            "truncation": "disabled",
            "usage": usage,
            "user": b.user,
            "metadata": b.metadata or {},
            "background": False,
            "service_tier": b.service_tier or "default",
            "safety_identifier": b.safety_identifier,
            "prompt_cache_key": b.prompt_cache_key,
            "completed_at": int(time.time()) if status == "completed" else None,
            **extra,
        }


def reasoning_item(text: str, status: str = "completed") -> dict[str, Any]:
    return {
        "type": "reasoning",
        "id": _new_id("rs"),
        "summary": [],
        "content": [{"type": "reasoning_text", "text": text}],
        "status": status,
    }


def message_item(text: str, status: str = "completed") -> dict[str, Any]:
    return {
        "type": "message",
        "id": _new_id("msg"),
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
    }


def call_item(call: ToolCall, tools: ResponsesTools, status: str = "completed") -> dict[str, Any]:
    prefix = "ctc" if call.name in tools.custom else "fc"
    return tools.item(call, _new_id(prefix), status)


def output_items(
    out: ChatOutput, tools: ResponsesTools, status: str = "completed"
) -> list[dict[str, Any]]:
    """The reply's items. Cut off by the limit, the item holding the cut text is `incomplete`,
    as OpenAI's: the message (a call cut in half is text in it), else the reasoning."""
    items = [reasoning_item(out.reasoning)] if out.reasoning else []
    if out.content or not out.tool_calls:
        items.append(message_item(out.content))
    calls = [call_item(c, tools) for c in out.tool_calls]
    if status != "completed" and items:
        items[-1]["status"] = status
    return items + calls


def reply_message(out: ChatOutput) -> dict[str, Any]:
    """The reply as a turn of the stored conversation."""
    msg: dict[str, Any] = {"role": "assistant", "content": out.content}
    if out.tool_calls:
        msg["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in out.tool_calls
        ]
    return msg


def _ending(done: Done) -> tuple[str, dict[str, Any]]:
    """The response's status and its incomplete_details."""
    if done.finished.reason == "length":
        return "incomplete", {"incomplete_details": {"reason": "max_output_tokens"}}
    return "completed", {}


def _function_choice(raw: Any, tools: ResponsesTools) -> Any:
    """A named custom tool (`{"type": "custom", "name"}`) is chosen as the function it is
    offered as."""
    if isinstance(raw, dict) and raw.get("type") == "custom" and raw.get("name") in tools.custom:
        return {"type": "function", "name": raw["name"]}
    return raw


class ResponsesController(Controller):
    """OpenAI's Responses API over the generation pipeline."""

    path = "/v1/responses"
    tags = ["openai"]  # noqa: RUF012
    exception_handlers = OPENAI_ERRORS

    @post("/", status_code=200)
    async def create(
        self,
        rt: NamedDependency[Runtime],
        state: State,
        request: Request[Any, Any, Any],
        data: JSONBody[ResponsesRequest],
    ) -> Response[Any]:
        store = store_of(state)
        history: list[dict[str, Any]] = []
        if data.previous_response_id is not None:
            prev = store.get(data.previous_response_id)
            if prev is None:
                raise not_found(data.previous_response_id, "previous_response_id")
            history = prev.messages
        messages = input_messages(data.input, history)
        offered = parse_tools(data.tools, client=request.headers.get("user-agent", ""))
        tools = offered.specs
        choice = parse_tool_choice(
            _function_choice(data.tool_choice, offered), tools, named=RESPONSES_NAMED_CHOICE
        )
        json_mode, schema, fmt = _text_format(data.text)
        system = [{"role": "system", "content": data.instructions}] if data.instructions else []
        req = GenerateRequest(
            model=data.model,
            messages=system + messages,
            affinity=data.prompt_cache_key,  # Codex: its session id
            max_tokens=data.max_output_tokens,
            sampling=Sampling(
                temperature=data.temperature,
                top_p=data.top_p,
                presence_penalty=data.presence_penalty,
                frequency_penalty=data.frequency_penalty,
            ),
            json_mode=json_mode,
            json_schema=schema,
            tools=tools,
            tool_choice=choice,
            parallel_tool_calls=data.parallel_tool_calls is not False,
            keep_alive=keep_alive_value(data.keep_alive),
            label="openai",
            path="/v1/responses",
        )
        run = await rt.service.start(req)
        # Unset, OpenAI echoes "auto" (what it would be with tools), tools or not.
        echo: Any = data.tool_choice if data.tool_choice is not None else "auto"
        builder = _Builder(data, echo, fmt, run, offered)

        def keep(response: dict[str, Any], out: ChatOutput) -> None:
            if data.store is not False:
                store.put(builder.id, response, [*messages, reply_message(out)])

        if data.stream:
            return EventStream(_stream(run, builder, keep))
        result = await run.result()
        if (failure := run.failure) is not None:
            raise failure
        out = result.outputs[0]
        status, extra = _ending(Done(0, result.finished[0]))
        builder.output = output_items(out, offered, status)
        response = builder.response(status, run, **extra)
        keep(response, out)
        return Response(response)

    @get("/{response_id:str}")
    async def retrieve(self, state: State, response_id: FromPath[str]) -> dict[str, Any]:
        item = store_of(state).get(response_id)
        if item is None:
            raise not_found(response_id)
        return item.response

    @delete("/{response_id:str}", status_code=200)
    async def remove(self, state: State, response_id: FromPath[str]) -> dict[str, Any]:
        if not store_of(state).delete(response_id):
            raise not_found(response_id)
        return {"id": response_id, "object": "response", "deleted": True}


async def _stream(run: Run, builder: _Builder, keep: Any) -> AsyncIterator[dict[str, Any]]:
    """The `response.*` event sequence: created, in_progress, then per output item `added`,
    its deltas and `done`, then completed (or incomplete, or failed)."""
    seq = 0
    item: dict[str, Any] | None = None  # the open output item
    text: list[str] = []  # its text (message or reasoning) so far
    content, reasoning = [], []
    calls: list[ToolCall] = []

    def event(kind: str, **body: Any) -> dict[str, Any]:
        nonlocal seq
        seq += 1
        data = {"type": kind, "sequence_number": seq - 1, **body}
        return {"event": kind, "data": msgspec.json.encode(data).decode()}

    def where() -> dict[str, Any]:
        assert item is not None
        return {"item_id": item["id"], "output_index": len(builder.output)}

    def open_item(new: dict[str, Any]) -> list[dict[str, Any]]:
        nonlocal item
        out = close_item()
        item = new
        text.clear()
        out.append(event("response.output_item.added", output_index=len(builder.output), item=new))
        if new["type"] == "message":
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            out.append(event("response.content_part.added", **where(), content_index=0, part=part))
        return out

    def close_item(status: str = "completed") -> list[dict[str, Any]]:
        nonlocal item
        if item is None:
            return []
        out = []
        whole = "".join(text)
        kind = item["type"]
        if kind == "message":
            done_item = message_item(whole, status)
            part = done_item["content"][0]
            out.append(
                event(
                    "response.output_text.done", **where(), content_index=0, text=whole, logprobs=[]
                )
            )
            out.append(event("response.content_part.done", **where(), content_index=0, part=part))
        elif kind == "reasoning":
            done_item = reasoning_item(whole, status)
            out.append(
                event("response.reasoning_text.done", **where(), content_index=0, text=whole)
            )
        elif kind == "custom_tool_call":
            # The input is known once the call's arguments are whole: one delta, then done.
            call = ToolCall(item["call_id"], item["name"], whole)
            done_item = call_item(call, builder.tools, status)
            text_in = done_item["input"]
            if text_in:
                out.append(event("response.custom_tool_call_input.delta", **where(), delta=text_in))
            out.append(event("response.custom_tool_call_input.done", **where(), input=text_in))
        else:
            done_item = {**item, "arguments": whole, "status": status}
            out.append(
                event(
                    "response.function_call_arguments.done",
                    **where(),
                    name=item["name"],
                    arguments=whole,
                )
            )
        done_item["id"] = item["id"]
        out.append(
            event("response.output_item.done", output_index=len(builder.output), item=done_item)
        )
        builder.output.append(done_item)
        item = None
        return out

    try:
        yield event("response.created", response=builder.response("in_progress"))
        yield event("response.in_progress", response=builder.response("in_progress"))
        async for ev in run.events():
            if isinstance(ev, Delta):
                if item is None or item["type"] != "message":
                    for e in open_item(message_item("", "in_progress") | {"content": []}):
                        yield e
                text.append(ev.text)
                content.append(ev.text)
                yield event(
                    "response.output_text.delta",
                    **where(),
                    content_index=0,
                    delta=ev.text,
                    logprobs=[],
                )
            elif isinstance(ev, Reasoning):
                if item is None or item["type"] != "reasoning":
                    for e in open_item(reasoning_item("", "in_progress") | {"content": []}):
                        yield e
                text.append(ev.text)
                reasoning.append(ev.text)
                yield event(
                    "response.reasoning_text.delta", **where(), content_index=0, delta=ev.text
                )
            elif isinstance(ev, CallStart):
                new = call_item(ToolCall(ev.id, ev.name, ""), builder.tools, "in_progress")
                for e in open_item(new):
                    yield e
            elif isinstance(ev, CallDelta):
                text.append(ev.arguments)
                if item is not None and item["type"] == "function_call":
                    yield event(
                        "response.function_call_arguments.delta", **where(), delta=ev.arguments
                    )
            elif isinstance(ev, CallEnd):
                if ev.complete:
                    calls.append(ToolCall(ev.id, ev.name, ev.arguments))
                for e in close_item("completed" if ev.complete else "incomplete"):
                    yield e
            elif isinstance(ev, Done):
                if ev.finished.reason == "error":
                    error = {"code": "server_error", "message": ev.finished.error or "failed"}
                    yield event(
                        "response.failed", response=builder.response("failed", run, error=error)
                    )
                    return
                status, extra = _ending(ev)
                for e in close_item(status):  # the item the limit cut off is incomplete
                    yield e
                if not builder.output:  # an empty reply is still one (empty) message
                    for e in open_item(message_item("", "in_progress") | {"content": []}):
                        yield e
                    for e in close_item(status):
                        yield e
                response = builder.response(status, run, **extra)
                keep(response, ChatOutput("".join(content), "".join(reasoning), calls))
                kind = "response.completed" if status == "completed" else "response.incomplete"
                yield event(kind, response=response)
    finally:
        await run.aclose()
