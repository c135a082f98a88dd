"""The Ollama dialect (/api/*): Ollama clients work unchanged over the generation pipeline.

Requests in (Ollama fields and `options` to a `GenerateRequest`), events out (NDJSON lines or
one object), errors out (`{"error": "..."}`, by this router's exception handlers).
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import msgspec
from litestar import Controller, Response, delete, get, post
from litestar.di import NamedDependency
from litestar.params import JSONBody
from litestar.response import Stream
from msgspec import Meta

from server import __version__
from server.api.errors import OLLAMA_ERRORS
from server.api.openai import keep_alive_value
from server.api.schemas import (
    Duration,
    NonEmpty,
    Penalty,
    Probability,
    RepeatPenalty,
    Temperature,
    TopK,
)
from server.discovery import ModelInfo
from server.engines.base import Finished
from server.errors import EngineFailure, InvalidRequest, LmxError
from server.pipeline import CallEnd, Delta, Done, GenerateRequest, Reasoning, Run, Sampling
from server.reasoning import template_thinks
from server.runtime import Runtime
from server.scheduler import LoadedModel
from server.toolcalls import parse_tool_choice, parse_tools, template_takes_tools

NDJSON = "application/x-ndjson"


class Options(msgspec.Struct, kw_only=True):
    """Ollama's `options` (those llama.cpp sampling understands; others are ignored), with the
    same bounds as the OpenAI API."""

    temperature: Temperature | None = None
    top_p: Probability | None = None
    top_k: TopK | None = None
    min_p: Probability | None = None
    repeat_penalty: RepeatPenalty | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    seed: int | None = None
    num_predict: int | None = None  # <= 0: until the context is full
    stop: Annotated[list[str], Meta(max_length=16)] | None = None


class Message(msgspec.Struct, kw_only=True):
    role: str
    content: str = ""
    images: list[str] | None = None
    thinking: str | None = None  # an earlier reply's thinking (not sent to the model again)
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's calls
    tool_name: str | None = None  # a tool result: the function that gave it
    tool_call_id: str | None = None


# Ollama's `format`: "json", or a JSON schema the output must match.
Format = Literal["json", ""] | dict[str, Any] | None


class ChatBody(msgspec.Struct, kw_only=True):
    model: str
    messages: list[Message] = []
    stream: bool = True
    format: Format = None
    options: Options | None = None
    keep_alive: Duration = None
    tools: list[dict[str, Any]] | None = None
    think: bool | str | None = None  # True (or a level): thinking in `message.thinking`
    tool_choice: Any = None  # lmx extension (Ollama ignores it): OpenAI's tool_choice


class GenerateBody(msgspec.Struct, kw_only=True):
    model: str
    prompt: str = ""
    system: str | None = None
    stream: bool = True
    raw: bool = False
    format: Format = None
    options: Options | None = None
    keep_alive: Duration = None
    images: list[str] | None = None
    think: bool | str | None = None


class EmbedBody(msgspec.Struct, kw_only=True):
    model: str
    input: NonEmpty | Annotated[list[NonEmpty], Meta(min_length=1)]
    keep_alive: Duration = None


class EmbeddingsBody(msgspec.Struct, kw_only=True):
    model: str
    prompt: NonEmpty
    keep_alive: Duration = None


class ModelBody(msgspec.Struct, kw_only=True):
    model: str | None = None
    name: str | None = None  # older clients

    @property
    def which(self) -> str:
        if not (self.model or self.name):
            raise InvalidRequest("model is required", param="model")
        return str(self.model or self.name)


class PullBody(msgspec.Struct, kw_only=True):
    model: str | None = None
    name: str | None = None
    stream: bool = True
    insecure: bool = False


class NotSupported(LmxError):
    """A known endpoint asked for something lmx does not do."""

    status = 501
    type = "server_error"
    code = "not_implemented"


@functools.lru_cache(maxsize=64)
def _template_caps(source: str) -> tuple[bool, bool]:
    """(takes tools, thinks) for a chat template's source; probing renders it, so once each."""
    if not source:
        return False, False
    return template_takes_tools(source), template_thinks(source)


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _details(info: ModelInfo) -> dict[str, Any]:
    arch = info.architecture or ""
    return {
        "parent_model": "",
        "format": info.format,
        "family": arch,
        "families": [arch] if arch else None,
        "parameter_size": _param_size(info.parameters),
        "quantization_level": info.quantization or "",
    }


def _param_size(n: int | None) -> str:
    if not n:
        return ""
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def _tag(rt: Runtime, info: ModelInfo) -> dict[str, Any]:
    mtime = info.path.stat().st_mtime if info.path.exists() else 0
    name = info.id if ":" in info.id.rsplit("/", 1)[-1] else f"{info.id}:latest"
    return {
        "name": name,
        "model": name,
        "modified_at": datetime.fromtimestamp(mtime, UTC).isoformat().replace("+00:00", "Z"),
        "size": info.size_bytes,
        "digest": rt.catalog.digest(info),
        "details": _details(info),
    }


def _ps_entry(rt: Runtime, lm: LoadedModel) -> dict[str, Any]:
    left = lm.expires_in()
    expires = (datetime.now(UTC).timestamp() + left) if left is not None else 4102444800
    devices = lm.estimate.by_device()
    return {
        **_tag(rt, lm.info),
        "size": lm.measured or lm.estimate.total,
        "size_vram": sum(b for d, b in devices.items() if d != "ram"),
        "expires_at": datetime.fromtimestamp(expires, UTC).isoformat().replace("+00:00", "Z"),
        "context_length": lm.options.n_ctx,
    }


def _sampling(o: Options | None) -> Sampling:
    o = o or Options()
    return Sampling(
        temperature=o.temperature,
        top_p=o.top_p,
        top_k=o.top_k,
        min_p=o.min_p,
        repeat_penalty=o.repeat_penalty,
        presence_penalty=o.presence_penalty,
        frequency_penalty=o.frequency_penalty,
        seed=o.seed,
    )


def _format(fmt: str | dict[str, Any] | None) -> tuple[bool, dict[str, Any] | None]:
    if fmt is None or fmt == "":
        return False, None
    if fmt == "json":
        return True, None
    if isinstance(fmt, dict):
        return True, fmt
    raise InvalidRequest(f"format must be 'json' or a JSON schema, not {fmt!r}", param="format")


def _request(
    model: str,
    options: Options | None,
    fmt: Any,
    keep_alive: float | None,
    path: str,
    **what: Any,
) -> GenerateRequest:
    json_mode, schema = _format(fmt)
    o = options or Options()
    want = o.num_predict if o.num_predict and o.num_predict > 0 else None
    return GenerateRequest(
        model=model,
        max_tokens=want,
        sampling=_sampling(o),
        stop=list(o.stop or []),
        json_mode=json_mode,
        json_schema=schema,
        keep_alive=keep_alive,
        label="ollama",
        path=path,
        param_prefix="options.",
        **what,
    )


def _think(value: bool | str | None) -> bool | None:
    """Ollama's `think`: a bool, or a level ("high", ...) for models that take one."""
    if isinstance(value, str):
        if value not in ("high", "medium", "low"):
            raise InvalidRequest(
                f"think must be true, false, 'high', 'medium' or 'low', not {value!r}",
                param="think",
            )
        return True
    return value


def _messages(messages: list[Message]) -> list[dict[str, Any]]:
    """Ollama messages as the pipeline's: calls get ids (Ollama's may have none) and each
    tool result is matched to the call it answers, by id, by name, or in order."""
    out: list[dict[str, Any]] = []
    pending: list[tuple[str, str]] = []  # (id, name) of calls not answered yet
    for i, m in enumerate(messages):
        msg: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            calls = []
            for k, call in enumerate(m.tool_calls):
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise InvalidRequest(
                        f"messages[{i}].tool_calls[{k}] needs function.name", param="messages"
                    )
                args = fn.get("arguments", {})
                if not isinstance(args, (dict, str)):
                    raise InvalidRequest(
                        f"messages[{i}].tool_calls[{k}].function.arguments must be an object",
                        param="messages",
                    )
                cid = str(call.get("id") or f"call_{i}_{k}")
                calls.append({"id": cid, "function": {"name": fn["name"], "arguments": args}})
                pending.append((cid, fn["name"]))
            msg["tool_calls"] = calls
        if m.role == "tool":
            ids = [p for p in pending if p[0] == m.tool_call_id] or [
                p for p in pending if p[1] == m.tool_name
            ]
            match = ids[0] if ids else pending[0] if pending else None
            if match is None:
                raise InvalidRequest(
                    f"messages[{i}] is a tool result, but no earlier assistant message made a "
                    "tool call",
                    param="messages",
                )
            pending.remove(match)
            msg["tool_call_id"], msg["name"] = match[0], m.tool_name or match[1]
        out.append(msg)
    return out


def _call(ev: CallEnd) -> dict[str, Any]:
    """A finished call in Ollama's shape: arguments as an object."""
    try:
        args = json.loads(ev.arguments) if ev.arguments else {}
    except ValueError:
        args = {}
    return {"id": ev.id, "function": {"index": ev.call, "name": ev.name, "arguments": args}}


def _final(model: str, run: Run, fin: Finished) -> dict[str, Any]:
    total = time.perf_counter() - run.started
    t = fin.timings
    prompt_s = (t.ttft_ms - t.queue_ms) / 1000 if t else 0.0
    load_s = run.load_seconds
    return {
        "model": model,
        "created_at": _now(),
        "done": True,
        "done_reason": fin.reason if fin.reason in ("stop", "length") else "stop",
        "total_duration": int(total * 1e9),
        "load_duration": int(load_s * 1e9),
        "prompt_eval_count": fin.prompt_tokens,
        "prompt_eval_duration": int(max(prompt_s, 0.0) * 1e9),
        "eval_count": fin.completion_tokens,
        "eval_duration": int(max(total - prompt_s - load_s, 0.0) * 1e9),
    }


# The Ollama release whose API these routes follow.
OLLAMA_API_VERSION = "0.13.5"


class OllamaController(Controller):
    """Ollama's wire format: NDJSON streams, `{"error": ...}` errors, keep_alive semantics."""

    path = "/api"
    tags = ["ollama"]  # noqa: RUF012
    exception_handlers = OLLAMA_ERRORS

    @get("/version")
    async def version(self) -> dict[str, Any]:
        # Ollama clients gate features on this (Codex's --oss wants 0.13.4 or newer): the
        # version of Ollama's API lmx speaks, and lmx's own beside it.
        return {"version": OLLAMA_API_VERSION, "lmx": __version__}

    @get("/tags")
    async def tags_(self, rt: NamedDependency[Runtime]) -> dict[str, Any]:
        models = [m for m in rt.catalog.models() if m.usable]
        # The first listing of a file not in a blob store hashes it (cached afterwards).
        return {"models": await asyncio.to_thread(lambda: [_tag(rt, m) for m in models])}

    @get("/ps")
    async def ps(self, rt: NamedDependency[Runtime]) -> dict[str, Any]:
        loaded = rt.scheduler.loaded()
        return {"models": await asyncio.to_thread(lambda: [_ps_entry(rt, lm) for lm in loaded])}

    @post("/show", status_code=200)
    async def show(self, rt: NamedDependency[Runtime], data: JSONBody[ModelBody]) -> dict[str, Any]:
        info = rt.catalog.resolve(data.which)
        meta = dict(info.header.metadata) if info.header else {}
        meta.pop("tokenizer.chat_template", None)
        mc = rt.settings.model_config(info.id)
        template = (mc.chat_template if mc else None) or info.chat_template or ""
        tools, thinks = await asyncio.to_thread(_template_caps, template)
        caps = ["completion", "embedding"]
        caps += ["tools"] if tools else []
        caps += ["thinking"] if thinks else []
        return {
            "modelfile": f"FROM {info.path}\n",
            "parameters": "",
            "template": template,
            "details": _details(info),
            "model_info": {k: v for k, v in meta.items() if not isinstance(v, list)},
            "capabilities": caps,
            "modified_at": _tag(rt, info)["modified_at"],
        }

    @post("/chat", status_code=200)
    async def chat(self, rt: NamedDependency[Runtime], data: JSONBody[ChatBody]) -> Response[Any]:
        tools = parse_tools(data.tools)
        if any(m.images for m in data.messages):
            raise InvalidRequest("this model does not accept images", param="messages")
        ka = keep_alive_value(data.keep_alive)
        if not data.messages:
            return Response(await self._load_or_unload(rt, data.model, ka, chat=True))
        req = _request(
            data.model,
            data.options,
            data.format,
            ka,
            "/api/chat",
            messages=_messages(data.messages),
            tools=tools,
            tool_choice=parse_tool_choice(data.tool_choice, tools),
            think=_think(data.think),
        )
        return await self._respond(rt, req, data.model, data.stream, chat=True)

    @post("/generate", status_code=200)
    async def generate(
        self, rt: NamedDependency[Runtime], data: JSONBody[GenerateBody]
    ) -> Response[Any]:
        if data.images:
            raise InvalidRequest("this model does not accept images", param="images")
        ka = keep_alive_value(data.keep_alive)
        if not data.prompt:
            return Response(await self._load_or_unload(rt, data.model, ka, chat=False))
        if data.raw:
            what: dict[str, Any] = {"prompts": [data.prompt], "raw": True}
        else:
            msgs = [{"role": "system", "content": data.system}] if data.system else []
            what = {"messages": [*msgs, {"role": "user", "content": data.prompt}]}
        req = _request(
            data.model,
            data.options,
            data.format,
            ka,
            "/api/generate",
            think=_think(data.think),
            **what,
        )
        return await self._respond(rt, req, data.model, data.stream, chat=False)

    async def _load_or_unload(
        self, rt: Runtime, model: str, ka: float | None, *, chat: bool
    ) -> dict[str, Any]:
        """Ollama's empty prompt loads a model (keep_alive 0: unloads it)."""
        if ka == 0:
            info = rt.catalog.target(model).info
            await asyncio.to_thread(rt.models.unload, info.id)
            reason = "unload"
        else:
            lease = await rt.service.load(model, ka)
            lease.release()
            reason = "load"
        body: dict[str, Any] = {
            "model": model,
            "created_at": _now(),
            "done": True,
            "done_reason": reason,
        }
        body.update({"message": {"role": "assistant", "content": ""}} if chat else {"response": ""})
        return body

    async def _respond(
        self, rt: Runtime, req: GenerateRequest, model: str, streaming: bool, *, chat: bool
    ) -> Response[Any]:
        run = await rt.service.start(req)
        show_thinking = req.think is not False

        def piece(
            text: str, thinking: str = "", calls: list[dict[str, Any]] | None = None
        ) -> dict[str, Any]:
            out: dict[str, Any] = {"model": model, "created_at": _now(), "done": False}
            if chat:
                msg: dict[str, Any] = {"role": "assistant", "content": text}
                if thinking and show_thinking:
                    msg["thinking"] = thinking
                if calls:
                    msg["tool_calls"] = calls
                out["message"] = msg
            else:
                out["response"] = text
                if thinking and show_thinking:
                    out["thinking"] = thinking
            return out

        if streaming:
            return Stream(_ndjson(run, model, piece, show_thinking), media_type=NDJSON)
        result = await run.result()
        if (failure := run.failure) is not None:
            raise failure
        reply = result.outputs[0]
        calls = [
            _call(CallEnd(0, k, c.id, c.name, c.arguments)) for k, c in enumerate(reply.tool_calls)
        ]
        body = piece(reply.content, reply.reasoning, calls)
        return Response({**body, **_final(model, run, result.finished[0])})

    @post("/embed", status_code=200)
    async def embed(
        self, rt: NamedDependency[Runtime], data: JSONBody[EmbedBody]
    ) -> dict[str, Any]:
        texts = [data.input] if isinstance(data.input, str) else data.input
        _, vectors, n = await rt.service.embed(
            data.model,
            texts,
            keep_alive=keep_alive_value(data.keep_alive),
            label="ollama",
            path="/api/embed",
        )
        return {"model": data.model, "embeddings": vectors, "prompt_eval_count": n}

    @post("/embeddings", status_code=200)
    async def embeddings(
        self, rt: NamedDependency[Runtime], data: JSONBody[EmbeddingsBody]
    ) -> dict[str, Any]:
        _, vectors, _ = await rt.service.embed(
            data.model,
            [data.prompt],
            keep_alive=keep_alive_value(data.keep_alive),
            label="ollama",
            path="/api/embeddings",
        )
        return {"embedding": vectors[0]}

    @delete("/delete", status_code=200, opt={"scope": "admin"})
    async def delete_(self, rt: NamedDependency[Runtime], data: JSONBody[ModelBody]) -> None:
        await asyncio.to_thread(rt.models.remove, data.which)

    @post("/pull", status_code=200, opt={"scope": "admin"})
    async def pull(self, rt: NamedDependency[Runtime], data: JSONBody[PullBody]) -> Response[Any]:
        name = data.model or data.name or ""
        repo, _, quant = name.removeprefix("hf.co/").removeprefix("huggingface.co/").partition(":")
        if not name.startswith(("hf.co/", "huggingface.co/")) or repo.count("/") != 1:
            raise NotSupported(
                f"lmx pulls GGUF repositories from the Hugging Face hub: use "
                f"hf.co/ORG/REPO[:QUANT], not {name!r}"
            )
        jobs = await asyncio.to_thread(rt.models.pull, repo, quant or None, None)
        if not data.stream:
            for j in jobs:
                await asyncio.to_thread(rt.downloads.wait, j.id)
            failed = [j for j in jobs if j.state != "done"]
            if failed:
                raise EngineFailure(failed[0].error or f"download {failed[0].state}")
            return Response({"status": "success"})
        return Stream(_pull_progress(rt, jobs), media_type=NDJSON)


async def _ndjson(run: Run, model: str, piece: Any, show_thinking: bool) -> AsyncIterator[bytes]:
    """One line per piece of answer or thinking; a tool call goes out whole when it ends, with
    its arguments as an object (as Ollama sends them), and one the reply broke off as text."""
    try:
        async for ev in run.events():
            if isinstance(ev, Delta):
                yield msgspec.json.encode(piece(ev.text)) + b"\n"
            elif isinstance(ev, Reasoning):
                if show_thinking:
                    yield msgspec.json.encode(piece("", ev.text)) + b"\n"
            elif isinstance(ev, CallEnd):
                if ev.complete:
                    yield msgspec.json.encode(piece("", "", [_call(ev)])) + b"\n"
                elif ev.raw:  # a call the reply broke off: its text, as the whole reply gives it
                    yield msgspec.json.encode(piece(ev.raw)) + b"\n"
            elif isinstance(ev, Done):
                if ev.finished.reason == "error":
                    yield msgspec.json.encode({"error": ev.finished.error}) + b"\n"
                    return
                final = {**piece(""), **_final(model, run, ev.finished)}
                yield msgspec.json.encode(final) + b"\n"
    finally:
        await run.aclose()


async def _pull_progress(rt: Runtime, jobs: list[Any]) -> AsyncIterator[bytes]:
    def line(obj: dict[str, Any]) -> bytes:
        return msgspec.json.encode(obj) + b"\n"

    yield line({"status": "pulling manifest"})
    while any(j.state in ("queued", "running") for j in jobs):
        for j in jobs:
            yield line(
                {
                    "status": f"pulling {j.sha256[:12]}",
                    "digest": f"sha256:{j.sha256}",
                    "total": j.size,
                    "completed": j.done,
                }
            )
        # The download runs on its own thread: it may finish while the lines above go out.
        active = next((j for j in jobs if j.state in ("queued", "running")), None)
        if active is not None:
            await asyncio.to_thread(rt.downloads.wait, active.id, 0.5)
    bad = [j for j in jobs if j.state != "done"]
    if bad:
        yield line({"error": bad[0].error or f"download {bad[0].state}"})
        return
    yield line({"status": "verifying sha256 digest"})
    yield line({"status": "success"})
