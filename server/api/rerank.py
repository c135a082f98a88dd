"""Rerank, in the shape Jina, Cohere, llama-server and vLLM share: POST /v1/rerank (and
/rerank, /v1/reranking, /reranking, llama-server's other names).

`query` and `documents` (strings or `{"text": ...}`) in; `results` out, most relevant first,
each with its `index` in `documents` and a `relevance_score` in [0, 1]; `top_n` keeps the
best n, `return_documents` echoes each document's text. A reranker GGUF scores with its own
head; any instruct model scores by judging each pair (server.engines.rerank). Errors are
OpenAI error objects, as llama-server's and vLLM's are.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

import msgspec
from litestar import Controller, post
from litestar.di import NamedDependency
from litestar.params import JSONBody
from msgspec import Meta

from server.api.errors import OPENAI_ERRORS
from server.api.openai import keep_alive_value
from server.api.schemas import Duration, NonEmpty, PositiveInt
from server.api.tokens import model_or_loaded
from server.runtime import Runtime

MAX_DOCUMENTS = 1000  # per request, as Cohere's limit


class RerankDocument(msgspec.Struct):
    text: str


class RerankBody(msgspec.Struct, kw_only=True):
    query: NonEmpty
    documents: Annotated[list[str | RerankDocument], Meta(min_length=1, max_length=MAX_DOCUMENTS)]
    model: str | None = None
    top_n: PositiveInt | None = None
    return_documents: bool = False
    instruction: str | None = None  # the judge's task for an instruct model (Qwen3-Reranker)
    keep_alive: Duration = None


class RerankController(Controller):
    path = "/"
    tags = ["rerank"]  # noqa: RUF012
    exception_handlers = OPENAI_ERRORS

    @post("/v1/rerank", status_code=200)
    async def rerank(
        self, rt: NamedDependency[Runtime], data: JSONBody[RerankBody]
    ) -> dict[str, Any]:
        return await _rerank(rt, data)

    # llama-server's other names for it (left out of the OpenAPI document: the same operation).
    @post(["/rerank", "/v1/reranking", "/reranking"], status_code=200, include_in_schema=False)
    async def rerank_aliases(
        self, rt: NamedDependency[Runtime], data: JSONBody[RerankBody]
    ) -> dict[str, Any]:
        return await _rerank(rt, data)


async def _rerank(rt: Runtime, data: RerankBody) -> dict[str, Any]:
    texts = [d if isinstance(d, str) else d.text for d in data.documents]
    model, scores, n = await rt.service.rerank(
        model_or_loaded(rt, data.model),
        data.query,
        texts,
        instruction=data.instruction,
        keep_alive=keep_alive_value(data.keep_alive),
        label="rerank",
        path="/v1/rerank",
    )
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    results = []
    for i in order[: data.top_n]:
        item: dict[str, Any] = {"index": i, "relevance_score": scores[i]}
        if data.return_documents:
            item["document"] = {"text": texts[i]}
        results.append(item)
    return {
        "id": f"rerank-{uuid.uuid4().hex[:24]}",
        "object": "list",
        "model": model,
        "results": results,
        "usage": {"prompt_tokens": n, "total_tokens": n},
    }
