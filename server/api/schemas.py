"""Request bodies of the OpenAI-compatible API, validated by msgspec as they are decoded."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

# The same bounds as server.pipeline.SAMPLING_BOUNDS, stated here for the OpenAPI schema.
Probability = Annotated[float, Meta(ge=0.0, le=1.0)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
TopK = Annotated[int, Meta(ge=0)]
RepeatPenalty = Annotated[float, Meta(gt=0.0, le=10.0)]
PositiveInt = Annotated[int, Meta(ge=1)]
NonEmpty = Annotated[str, Meta(min_length=1)]
# Ollama-style durations as server.settings.parse_duration reads them: 10m, 1h30m, 45s, -1.
# Every part but the last has its unit, so the text splits one way only, as the parser reads it.
_NUMBER = r"-?[0-9]+(\.[0-9]+)?"
Duration = (
    Annotated[str, Meta(pattern=rf"^({_NUMBER}(ms|s|m|h))*{_NUMBER}(ms|s|m|h)?$")]
    | int
    | float
    | None
)
TokenId = Annotated[str, Meta(pattern=r"^-?[0-9]{1,9}$")]  # logit_bias keys


class ChatMessage(msgspec.Struct, kw_only=True):
    """One message; `content` may be a string or a list of OpenAI content parts."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's calls
    tool_call_id: str | None = None  # a tool result: the call it answers


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False


class JsonSchemaSpec(msgspec.Struct, kw_only=True):
    name: str = "response"
    schema: dict[str, Any] | None = None
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(msgspec.Struct, kw_only=True):
    """`text`, `json_object` (any JSON; llama.cpp's optional `schema`), or `json_schema`."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None
    schema: dict[str, Any] | None = None


class SamplingFields(msgspec.Struct, kw_only=True):
    """Fields shared by chat and text completions."""

    max_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: Probability | None = None
    top_k: TopK | None = None
    min_p: Probability | None = None
    repeat_penalty: RepeatPenalty | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    seed: int | None = None
    stop: str | Annotated[list[str], Meta(max_length=16)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Meta(ge=1, le=16)] = 1
    logprobs: bool | None = None
    logit_bias: dict[TokenId, Annotated[float, Meta(ge=-100, le=100)]] | None = None
    ignore_eos: bool = False  # lmx/llama.cpp extension: always generate max_tokens
    keep_alive: Duration = None  # lmx extension: as Ollama's keep_alive
    user: str | None = None


class ChatCompletionRequest(SamplingFields, kw_only=True):
    """POST /v1/chat/completions."""

    model: str
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    max_completion_tokens: PositiveInt | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool = True
    grammar: str | None = None  # llama.cpp extension: a GBNF the reply must follow
    prompt_cache_key: str | None = None  # OpenAI's: requests with one key share a cache


class CompletionRequest(SamplingFields, kw_only=True):
    """POST /v1/completions."""

    model: str
    prompt: NonEmpty | Annotated[list[NonEmpty], Meta(min_length=1)]
    echo: bool = False
    response_format: ResponseFormat | None = None


class EmbeddingRequest(msgspec.Struct, kw_only=True):
    """POST /v1/embeddings: one input string or a list of them."""

    model: str
    input: NonEmpty | Annotated[list[NonEmpty], Meta(min_length=1)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: PositiveInt | None = None
    keep_alive: Duration = None
    user: str | None = None


def state_constraints(openapi: Any, bodies: list[type]) -> None:
    """Put msgspec's own JSON Schema of each request body into the OpenAPI document.

    Litestar's generator drops some constraints msgspec enforces (a minimum of 0, anything
    inside a union), so a schema fuzzer would send values that are then refused; msgspec's
    schema states exactly what its decoder accepts."""
    _, components = msgspec.json.schema_components(
        bodies, ref_template="#/components/schemas/{name}"
    )
    schemas = openapi.components.schemas
    for name, component in components.items():
        schemas[name] = component  # plain dicts are written out as they are
