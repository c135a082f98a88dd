"""Token endpoints with llama-server's names: POST /tokenize, /detokenize, /apply-template.

Bots use them to count and budget before they send a request (Ollama has none). lmx serves
many models, so each takes an optional `model`; without one, the only loaded model answers
(as llama-server's one model would), else the default model. Errors are OpenAI error objects,
as llama-server's are.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Controller, post
from litestar.di import NamedDependency
from litestar.params import JSONBody
from msgspec import Meta

from server.api.errors import OPENAI_ERRORS
from server.api.openai import messages_of
from server.api.schemas import ChatMessage
from server.engines.base import Engine
from server.errors import InvalidRequest
from server.pipeline import GenerateRequest
from server.runtime import Runtime
from server.toolcalls import parse_tool_choice, parse_tools

MAX_TOKENS_IN = 1_000_000


class TokenizeBody(msgspec.Struct, kw_only=True):
    content: str
    model: str | None = None
    add_special: bool = False  # BOS and the like, as the model adds them to a prompt
    parse_special: bool = True  # "<|im_start|>" in the text is that one token
    with_pieces: bool = False  # each token with its text


class DetokenizeBody(msgspec.Struct, kw_only=True):
    tokens: Annotated[list[int], Meta(max_length=MAX_TOKENS_IN)]
    model: str | None = None


class ApplyTemplateBody(msgspec.Struct, kw_only=True):
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    model: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool = True


def model_or_loaded(rt: Runtime, given: str | None) -> str:
    """`given`, else the only loaded model (as llama-server's one model), else the default."""
    if given:
        return given
    loaded = rt.scheduler.loaded()
    return loaded[0].info.id if len(loaded) == 1 else "default"


class TokensController(Controller):
    """Tokenize, detokenize and render a chat template, without generating."""

    path = "/"
    tags = ["tokens"]  # noqa: RUF012
    exception_handlers = OPENAI_ERRORS

    @post("/tokenize", status_code=200)
    async def tokenize(
        self, rt: NamedDependency[Runtime], data: JSONBody[TokenizeBody]
    ) -> dict[str, Any]:
        def work(engine: Engine) -> Any:
            ids = engine.tokenize(
                data.content, add_special=data.add_special, special=data.parse_special
            )
            if not data.with_pieces:
                return ids
            return [{"id": t, "piece": engine.detokenize([t])} for t in ids]

        model, tokens = await rt.service.on_model(model_or_loaded(rt, data.model), work)
        return {"tokens": tokens, "model": model}

    @post("/detokenize", status_code=200)
    async def detokenize(
        self, rt: NamedDependency[Runtime], data: JSONBody[DetokenizeBody]
    ) -> dict[str, Any]:
        def work(engine: Engine) -> str:
            vocab = getattr(engine, "n_vocab", None)
            bad = [t for t in data.tokens if t < 0 or (vocab is not None and t >= vocab)]
            if bad:
                raise InvalidRequest(
                    f"tokens holds ids outside this model's vocabulary: {bad[:5]}", param="tokens"
                )
            return engine.detokenize(data.tokens)

        model, text = await rt.service.on_model(model_or_loaded(rt, data.model), work)
        return {"content": text, "model": model}

    @post("/apply-template", status_code=200)
    async def apply_template(
        self, rt: NamedDependency[Runtime], data: JSONBody[ApplyTemplateBody]
    ) -> dict[str, Any]:
        tools = parse_tools(data.tools)
        req = GenerateRequest(
            model=model_or_loaded(rt, data.model),
            messages=messages_of(data.messages),
            tools=tools,
            tool_choice=parse_tool_choice(data.tool_choice, tools),
            parallel_tool_calls=data.parallel_tool_calls,
            label="openai",
            path="/apply-template",
        )
        model, prompt = await rt.service.preview(req)
        return {"prompt": prompt.text or "", "tokens": len(prompt.tokens[0]), "model": model}
