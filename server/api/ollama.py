"""The Ollama API (/api/*), so Ollama clients work unchanged over the same registry."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import msgspec
from litestar import Controller, delete, get, post
from litestar.di import NamedDependency
from litestar.params import JSONBody
from litestar.response import Stream

from server import __version__
from server.api.openai import keep_alive_value, log_request
from server.discovery import ModelInfo
from server.engines.base import Finished, GenerationRequest, SamplingParams, TokenText, stream
from server.errors import ContextOverflow, EngineFailure, InvalidRequest, LmxError
from server.grammar import json_grammar
from server.registry import LoadedModel, Registry

NDJSON = "application/x-ndjson"


class Options(msgspec.Struct, kw_only=True):
    """Ollama's `options` (the ones llama.cpp sampling understands; others are ignored)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    num_predict: int | None = None
    stop: list[str] | None = None


class Message(msgspec.Struct, kw_only=True):
    role: str
    content: str = ""
    images: list[str] | None = None


class ChatBody(msgspec.Struct, kw_only=True):
    model: str
    messages: list[Message] = []
    stream: bool = True
    format: str | dict[str, Any] | None = None
    options: Options | None = None
    keep_alive: str | int | float | None = None
    tools: list[dict[str, Any]] | None = None


class GenerateBody(msgspec.Struct, kw_only=True):
    model: str
    prompt: str = ""
    system: str | None = None
    stream: bool = True
    raw: bool = False
    format: str | dict[str, Any] | None = None
    options: Options | None = None
    keep_alive: str | int | float | None = None
    images: list[str] | None = None


class EmbedBody(msgspec.Struct, kw_only=True):
    model: str
    input: str | list[str]
    keep_alive: str | int | float | None = None


class EmbeddingsBody(msgspec.Struct, kw_only=True):
    model: str
    prompt: str
    keep_alive: str | int | float | None = None


class ModelBody(msgspec.Struct, kw_only=True):
    model: str | None = None
    name: str | None = None  # older clients

    @property
    def which(self) -> str:
        if not (self.model or self.name):
            raise InvalidRequest("model is required", param="model")
        return str(self.model or self.name)


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _digest(info: ModelInfo) -> str:
    return hashlib.sha256(f"{info.path}:{info.size_bytes}".encode()).hexdigest()


def _details(info: ModelInfo) -> dict[str, Any]:
    arch = info.architecture or ""
    return {
        "parent_model": "",
        "format": "gguf",
        "family": arch,
        "families": [arch] if arch else None,
        "parameter_size": _param_size(info.parameters),
        "quantization_level": info.quantization or "",
    }


def _param_size(n: int | None) -> str:
    if not n:
        return ""
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def _tag(info: ModelInfo) -> dict[str, Any]:
    mtime = info.path.stat().st_mtime if info.path.exists() else 0
    name = info.id if ":" in info.id.rsplit("/", 1)[-1] else f"{info.id}:latest"
    return {
        "name": name,
        "model": name,
        "modified_at": datetime.fromtimestamp(mtime, UTC).isoformat().replace("+00:00", "Z"),
        "size": info.size_bytes,
        "digest": _digest(info),
        "details": _details(info),
    }


def _sampling(o: Options | None) -> SamplingParams:
    o = o or Options()
    return SamplingParams.merged(
        temperature=o.temperature,
        top_p=o.top_p,
        top_k=o.top_k,
        min_p=o.min_p,
        repeat_penalty=o.repeat_penalty,
        presence_penalty=o.presence_penalty,
        frequency_penalty=o.frequency_penalty,
        seed=o.seed,
    )


def _grammar(fmt: str | dict[str, Any] | None) -> str | None:
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return json_grammar(None)
    if isinstance(fmt, dict):
        return json_grammar(fmt)
    raise InvalidRequest(f"format must be 'json' or a JSON schema, not {fmt!r}", param="format")


def _request(
    lm: LoadedModel, prompt: list[int], o: Options | None, grammar: str | None
) -> GenerationRequest:
    limit = lm.engine.context_length
    if len(prompt) >= limit:
        raise ContextOverflow(len(prompt), limit)
    room = limit - len(prompt)
    want = o.num_predict if o and o.num_predict and o.num_predict > 0 else room
    stop = [s for s in (o.stop if o and o.stop else []) if s]
    return GenerationRequest(
        prompt, min(want, room), _sampling(o), stop=stop, grammar=grammar, label="ollama"
    )


def _final(model: str, fin: Finished, started: float, load_s: float) -> dict[str, Any]:
    total = time.perf_counter() - started
    t = fin.timings
    prompt_s = (t.ttft_ms - t.queue_ms) / 1000 if t else 0.0
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


class OllamaController(Controller):
    """Ollama's wire format: NDJSON streams, `{"error": ...}` errors, keep_alive semantics."""

    path = "/api"
    tags = ["ollama"]  # noqa: RUF012

    @get("/version")
    async def version(self) -> dict[str, Any]:
        return {"version": __version__}

    @get("/tags")
    async def tags_(self, registry: NamedDependency[Registry]) -> dict[str, Any]:
        return {"models": [_tag(m) for m in registry.models() if m.usable]}

    @get("/ps")
    async def ps(self, registry: NamedDependency[Registry]) -> dict[str, Any]:
        out = []
        for lm in registry.loaded():
            left = lm.expires_in()
            expires = (datetime.now(UTC).timestamp() + left) if left is not None else 4102444800
            out.append(
                {
                    **_tag(lm.info),
                    "size": lm.measured or lm.estimate.total,
                    "size_vram": 0,
                    "expires_at": datetime.fromtimestamp(expires, UTC)
                    .isoformat()
                    .replace("+00:00", "Z"),
                }
            )
        return {"models": out}

    @post("/show", status_code=200)
    async def show(
        self, registry: NamedDependency[Registry], data: JSONBody[ModelBody]
    ) -> dict[str, Any]:
        info = registry.resolve(data.which)
        meta = dict(info.header.metadata) if info.header else {}
        meta.pop("tokenizer.chat_template", None)
        return {
            "modelfile": f"FROM {info.path}\n",
            "parameters": "",
            "template": info.chat_template or "",
            "details": _details(info),
            "model_info": {k: v for k, v in meta.items() if not isinstance(v, list)},
            "capabilities": ["completion"],
            "modified_at": _tag(info)["modified_at"],
        }

    @post("/chat", status_code=200)
    async def chat(self, registry: NamedDependency[Registry], data: JSONBody[ChatBody]) -> Any:
        if data.tools:
            raise InvalidRequest("tool calling is not supported yet", param="tools")
        if any(m.images for m in data.messages):
            raise InvalidRequest("this model does not accept images", param="messages")
        msgs = [{"role": m.role, "content": m.content} for m in data.messages]
        return await self._run(
            registry,
            data.model,
            data.keep_alive,
            data.stream,
            data.options,
            data.format,
            "/api/chat",
            lambda lm: lm.engine.format_chat(msgs),
            chat=True,
            empty=not msgs,
        )

    @post("/generate", status_code=200)
    async def generate(
        self, registry: NamedDependency[Registry], data: JSONBody[GenerateBody]
    ) -> Any:
        if data.images:
            raise InvalidRequest("this model does not accept images", param="images")

        def prompt(lm: LoadedModel) -> list[int]:
            if data.raw:
                return lm.engine.tokenize(data.prompt, add_special=True, special=True)
            msgs = [{"role": "system", "content": data.system}] if data.system else []
            return lm.engine.format_chat([*msgs, {"role": "user", "content": data.prompt}])

        return await self._run(
            registry,
            data.model,
            data.keep_alive,
            data.stream,
            data.options,
            data.format,
            "/api/generate",
            prompt,
            chat=False,
            empty=not data.prompt,
        )

    async def _run(
        self,
        registry: Registry,
        model: str,
        keep_alive: Any,
        streaming: bool,
        options: Options | None,
        fmt: Any,
        path: str,
        make_prompt: Any,
        *,
        chat: bool,
        empty: bool,
    ) -> Any:
        ka = keep_alive_value(keep_alive)
        grammar = _grammar(fmt)
        started = time.perf_counter()
        if empty:  # Ollama's way to load (or, with keep_alive 0, unload) a model
            info = registry.resolve(model)
            if ka == 0:
                await asyncio.to_thread(registry.unload, info.id)
                reason = "unload"
            else:
                lm = await asyncio.to_thread(registry.acquire, info.id)
                registry.release(lm, ka)
                reason = "load"
            body: dict[str, Any] = {
                "model": model,
                "created_at": _now(),
                "done": True,
                "done_reason": reason,
            }
            body.update(
                {"message": {"role": "assistant", "content": ""}} if chat else {"response": ""}
            )
            return body
        loaded_before = registry.get_loaded(registry.resolve(model).id) is not None
        t_load = time.perf_counter()
        lm = await asyncio.to_thread(registry.acquire, model)
        load_s = 0.0 if loaded_before else time.perf_counter() - t_load
        handed = False
        try:
            prompt = await asyncio.to_thread(make_prompt, lm)
            req = _request(lm, prompt, options, grammar)

            def piece(text: str) -> dict[str, Any]:
                out: dict[str, Any] = {"model": model, "created_at": _now(), "done": False}
                if chat:
                    out["message"] = {"role": "assistant", "content": text}
                else:
                    out["response"] = text
                return out

            if streaming:
                handed = True
                return Stream(
                    self._ndjson(registry, lm, ka, req, piece, model, started, load_s, path),
                    media_type=NDJSON,
                )
            parts: list[str] = []
            fin: Finished | None = None
            async for _, ev in stream(lm.engine, [req]):
                if isinstance(ev, TokenText):
                    parts.append(ev.text)
                else:
                    fin = ev
            assert fin is not None
            if fin.reason == "error":
                raise EngineFailure(fin.error or "generation failed")
            log_request(registry, path, lm.info.id, 200, [fin], started)
            return {**piece("".join(parts)), **_final(model, fin, started, load_s)}
        finally:
            if not handed:
                registry.release(lm, ka)

    async def _ndjson(
        self,
        registry: Registry,
        lm: LoadedModel,
        ka: float | None,
        req: GenerationRequest,
        piece: Any,
        model: str,
        started: float,
        load_s: float,
        path: str,
    ) -> AsyncIterator[bytes]:
        status = 499
        fin: Finished | None = None
        try:
            async for _, ev in stream(lm.engine, [req]):
                if isinstance(ev, TokenText):
                    yield msgspec.json.encode(piece(ev.text)) + b"\n"
                    continue
                fin = ev
                if ev.reason == "error":
                    status = 503
                    yield msgspec.json.encode({"error": ev.error}) + b"\n"
                    return
                yield (
                    msgspec.json.encode({**piece(""), **_final(model, ev, started, load_s)}) + b"\n"
                )
            status = 200
        finally:
            registry.release(lm, ka)
            log_request(registry, path, lm.info.id, status, [fin] if fin else [], started)

    @post("/embed", status_code=200)
    async def embed(
        self, registry: NamedDependency[Registry], data: JSONBody[EmbedBody]
    ) -> dict[str, Any]:
        texts = [data.input] if isinstance(data.input, str) else data.input
        vectors, n = await self._embed(registry, data.model, texts, data.keep_alive)
        return {"model": data.model, "embeddings": vectors, "prompt_eval_count": n}

    @post("/embeddings", status_code=200)
    async def embeddings(
        self, registry: NamedDependency[Registry], data: JSONBody[EmbeddingsBody]
    ) -> dict[str, Any]:
        vectors, _ = await self._embed(registry, data.model, [data.prompt], data.keep_alive)
        return {"embedding": vectors[0]}

    async def _embed(
        self, registry: Registry, model: str, texts: list[str], keep_alive: Any
    ) -> tuple[list[list[float]], int]:
        if not texts:
            raise InvalidRequest("input is empty", param="input")
        ka = keep_alive_value(keep_alive)
        lm = await asyncio.to_thread(registry.acquire, model)
        try:
            vectors, n = await asyncio.to_thread(lm.engine.embed, texts)
        finally:
            registry.release(lm, ka)
        return vectors, n

    @delete("/delete", status_code=200)
    async def delete_(self, registry: NamedDependency[Registry], data: JSONBody[ModelBody]) -> None:
        await asyncio.to_thread(registry.remove, data.which)

    @post("/pull", status_code=200)
    async def pull(self, registry: NamedDependency[Registry], data: JSONBody[PullBody]) -> Any:
        name = data.model or data.name or ""
        repo, _, quant = name.removeprefix("hf.co/").removeprefix("huggingface.co/").partition(":")
        if not name.startswith(("hf.co/", "huggingface.co/")) or repo.count("/") != 1:
            raise NotSupported(
                f"lmx pulls GGUF repositories from the Hugging Face hub: use "
                f"hf.co/ORG/REPO[:QUANT], not {name!r}"
            )
        jobs = await asyncio.to_thread(registry.pull, repo, quant or None, None)
        if not data.stream:
            for j in jobs:
                await asyncio.to_thread(registry.downloads.wait, j.id)
            failed = [j for j in jobs if j.state != "done"]
            if failed:
                raise EngineFailure(failed[0].error or f"download {failed[0].state}")
            return {"status": "success"}
        return Stream(self._pull_progress(registry, jobs), media_type=NDJSON)

    async def _pull_progress(self, registry: Registry, jobs: list[Any]) -> AsyncIterator[bytes]:
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
            await asyncio.sleep(0.5)
        bad = [j for j in jobs if j.state != "done"]
        if bad:
            yield line({"error": bad[0].error or f"download {bad[0].state}"})
            return
        yield line({"status": "verifying sha256 digest"})
        yield line({"status": "success"})


class PullBody(msgspec.Struct, kw_only=True):
    model: str | None = None
    name: str | None = None
    stream: bool = True
    insecure: bool = False


class NotSupported(LmxError):
    """A known endpoint whose capability has not landed yet."""

    status = 501
    type = "server_error"
    code = "not_implemented"
