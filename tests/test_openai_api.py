"""The OpenAI-compatible API, through the official SDK, against a real server and model."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
from typing import Any

import httpx
import jsonschema
import openai
import pytest

MODEL = "smollm2-135m-instruct.q4_1"
HI = [{"role": "user", "content": "Say hello."}]


def test_health_and_schema(server: Any) -> None:
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok" and h["models_available"] >= 1
    spec = httpx.get(server.url + "/schema/openapi.json").json()
    assert "/v1/chat/completions" in spec["paths"]


def test_list_and_get_models(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list().data]
    assert MODEL in ids
    m = client.models.retrieve(MODEL)
    assert m.id == MODEL and m.object == "model"
    assert client.models.retrieve("default").id == MODEL  # aliases resolve


def test_chat_completion(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=16)
    c = r.choices[0]
    assert c.message.role == "assistant" and c.message.content
    assert c.finish_reason in ("stop", "length")
    assert r.usage and r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_prompt_tokens_are_exact(client: openai.OpenAI, smollm2_path: Any) -> None:
    from llama_cpp import Llama

    vocab = Llama(str(smollm2_path), vocab_only=True, verbose=False)
    text = "The quick brown fox jumps over the lazy dog."
    expected = len(vocab.tokenize(text.encode(), add_bos=True))
    r = client.completions.create(model=MODEL, prompt=text, max_tokens=3, temperature=0)
    assert r.usage and r.usage.prompt_tokens == expected
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_streaming_with_usage(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=HI,
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert (text and finish == ["length"]) or finish == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    pieces = sum(1 for c in chunks if c.choices and c.choices[0].delta.content)
    assert 0 < pieces <= chunks[-1].usage.completion_tokens <= 12


def test_max_completion_tokens_gives_length(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Write a long poem about the sea."}],
        max_completion_tokens=7,
        temperature=0,
    )
    assert r.choices[0].finish_reason == "length"
    assert r.usage and r.usage.completion_tokens == 7


def test_stop_sequence(client: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": "Count from 1 to 10, separated by commas."}]
    full = (
        client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=40, temperature=0)
        .choices[0]
        .message.content
        or ""
    )
    assert "3" in full, full
    cut = full[: full.index("3")]
    r = client.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=40, temperature=0, stop=["3"]
    )
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == cut
    s = client.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=40, temperature=0, stop="3", stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in s if c.choices) == cut


def test_seed_reproducibility(client: openai.OpenAI) -> None:
    def ask(seed: int) -> str:
        r = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Tell me a short story."}],
            max_tokens=24,
            temperature=1.0,
            seed=seed,
        )
        return r.choices[0].message.content or ""

    a = ask(1234)
    assert ask(1234) == a
    assert len({a, ask(1), ask(2), ask(3)}) > 1


def test_json_schema_output(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer"},
            "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        },
        "required": ["name", "age", "tags"],
        "additionalProperties": False,
    }
    r = client.chat.completions.create(
        model=MODEL,
        max_tokens=120,
        temperature=0,
        messages=[{"role": "user", "content": "Describe a person as JSON."}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": schema},
        },
    )
    data = json.loads(r.choices[0].message.content or "")
    jsonschema.validate(data, schema)


def test_json_object_output(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL,
        max_tokens=400,
        temperature=0,
        response_format={"type": "json_object"},
        messages=[
            {
                "role": "user",
                "content": "Give me a small JSON object about a cat with a name and an age.",
            }
        ],
    )
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content or ""), dict)


def test_n_choices(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=8, n=3, seed=7)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.message.content for c in r.choices)


def test_text_completions(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=0
    )
    assert r.object == "text_completion" and r.choices[0].text
    s = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in s if c.choices) == r.choices[0].text
    e = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=3, echo=True)
    assert e.choices[0].text.startswith("Once upon a time")


def test_embeddings_float_and_base64(client: openai.OpenAI) -> None:
    r = client.embeddings.create(model=MODEL, input=["The cat sat.", "A dog ran.", "The cat"])
    vecs = [d.embedding for d in r.data]
    assert len(vecs) == 3 and len(vecs[0]) == 576
    assert abs(sum(v * v for v in vecs[0]) - 1.0) < 1e-3
    assert r.usage.prompt_tokens > 6
    raw = httpx.post(
        str(client.base_url) + "embeddings",
        json={"model": MODEL, "input": "The cat sat.", "encoding_format": "base64"},
    )
    b = base64.b64decode(raw.json()["data"][0]["embedding"])
    decoded = struct.unpack(f"<{len(b) // 4}f", b)
    assert max(abs(x - y) for x, y in zip(decoded, vecs[0], strict=True)) < 1e-5
    assert r.data[0].index == 0 and r.data[2].index == 2


# ----- errors: OpenAI's error object, the right 4xx, and the server keeps serving --------------


def _post(server: Any, path: str, body: Any, **kw: Any) -> httpx.Response:
    if isinstance(body, (bytes, str)):
        return httpx.post(
            server.url + path, content=body, headers={"content-type": "application/json"}, **kw
        )
    return httpx.post(server.url + path, json=body, **kw)


def _assert_openai_error(r: httpx.Response, status: int, contains: str = "") -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert contains.lower() in err["message"].lower(), err["message"]
    return err


@pytest.mark.parametrize(
    ("body", "contains"),
    [
        (b'{"model": "default", "messages": [', "json"),
        (b"not json at all", "json"),
        ({"model": MODEL}, "messages"),
        ({"model": MODEL, "messages": []}, "length >= 1"),
        ({"model": MODEL, "messages": "hello"}, "array"),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, "role"),
        ({"model": MODEL, "messages": HI, "temperature": "hot"}, "temperature"),
        ({"model": MODEL, "messages": HI, "temperature": -1}, "temperature"),
        ({"model": MODEL, "messages": HI, "temperature": 9}, "temperature"),
        ({"model": MODEL, "messages": HI, "max_tokens": -5}, "max_tokens"),
        ({"model": MODEL, "messages": HI, "max_tokens": 0}, "max_tokens"),
        ({"model": MODEL, "messages": HI, "top_p": 1.5}, "top_p"),
        ({"model": MODEL, "messages": HI, "n": 0}, "'n'"),
        ({"model": MODEL, "messages": HI, "n": 1000}, "'n'"),
        ({"model": MODEL, "messages": HI, "stop": 5}, "stop"),
        ({"model": MODEL, "messages": HI, "response_format": {"type": "json_schema"}}, "schema"),
        ({"model": MODEL, "messages": HI, "logprobs": True}, "logprobs"),
        ({"model": 42, "messages": HI}, "model"),
    ],
)
def test_bad_chat_requests_are_400(server: Any, body: Any, contains: str) -> None:
    _assert_openai_error(_post(server, "/v1/chat/completions", body), 400, contains)


def test_unknown_model_is_404_naming_it(server: Any, client: openai.OpenAI) -> None:
    err = _assert_openai_error(
        _post(server, "/v1/chat/completions", {"model": "no-such-model", "messages": HI}),
        404,
        "no-such-model",
    )
    assert err["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    _assert_openai_error(_post(server, "/v1/embeddings", {"model": "nope", "input": "x"}), 404)


def test_prompt_longer_than_context_is_400_with_lengths(server: Any) -> None:
    long = "word " * 5000
    err = _assert_openai_error(
        _post(
            server,
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": long}]},
        ),
        400,
    )
    assert err["code"] == "context_length_exceeded"
    assert "length is 2048 tokens" in err["message"] and "prompt has 50" in err["message"]
    _assert_openai_error(
        _post(server, "/v1/completions", {"model": MODEL, "prompt": long}),
        400,
        "maximum context length",
    )
    _assert_openai_error(
        _post(server, "/v1/embeddings", {"model": MODEL, "input": long}),
        400,
        "maximum context length",
    )


def test_bad_completion_and_embedding_requests(server: Any) -> None:
    _assert_openai_error(_post(server, "/v1/completions", {"model": MODEL}), 400, "prompt")
    _assert_openai_error(_post(server, "/v1/completions", {"model": MODEL, "prompt": ""}), 400)
    _assert_openai_error(_post(server, "/v1/embeddings", {"model": MODEL, "input": []}), 400)
    _assert_openai_error(
        _post(server, "/v1/embeddings", {"model": MODEL, "input": [1, 2]}), 400, "string"
    )
    _assert_openai_error(
        _post(server, "/v1/embeddings", {"model": MODEL, "input": "x", "encoding_format": "hex"}),
        400,
    )


def test_unknown_route_and_method(server: Any) -> None:
    _assert_openai_error(httpx.get(server.url + "/v1/nothing"), 404)
    _assert_openai_error(httpx.get(server.url + "/v1/chat/completions"), 405)


def test_server_still_serves_after_errors(client: openai.OpenAI, server: Any) -> None:
    for _ in range(3):
        _post(server, "/v1/chat/completions", b"{{{")
    r = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=4)
    assert r.choices[0].message.content


async def test_16_concurrent_streams_all_complete(aclient: openai.AsyncOpenAI) -> None:
    async def one(i: int) -> tuple[str, str | None]:
        s = await aclient.chat.completions.create(
            model=MODEL,
            max_tokens=24,
            stream=True,
            messages=[{"role": "user", "content": f"Tell me fact number {i} about space."}],
        )
        text, reason = "", None
        async for c in s:
            if c.choices:
                text += c.choices[0].delta.content or ""
                reason = c.choices[0].finish_reason or reason
        return text, reason

    results = await asyncio.gather(*(one(i) for i in range(16)))
    assert len(results) == 16
    assert all(text and reason in ("stop", "length") for text, reason in results)


def test_logit_bias_and_ignore_eos(server: Any, smollm2_path: Any) -> None:
    from llama_cpp import Llama

    r = _post(
        server,
        "/v1/chat/completions",
        {"model": MODEL, "messages": HI, "max_tokens": 40, "ignore_eos": True},
    )
    assert r.json()["usage"]["completion_tokens"] == 40
    body = {"model": MODEL, "prompt": "One, two, three,", "max_tokens": 1, "temperature": 0}
    first = _post(server, "/v1/completions", body).json()["choices"][0]["text"]
    vocab = Llama(str(smollm2_path), vocab_only=True, verbose=False)
    (tok,) = vocab.tokenize(first.encode(), add_bos=False)
    banned = _post(server, "/v1/completions", {**body, "logit_bias": {str(tok): -100}}).json()
    assert banned["choices"][0]["text"] != first
    _assert_openai_error(
        _post(server, "/v1/completions", {"model": MODEL, "prompt": "x", "logit_bias": {"abc": 1}}),
        400,
        "logit_bias",
    )
    _assert_openai_error(
        _post(
            server,
            "/v1/completions",
            {"model": MODEL, "prompt": "x", "logit_bias": {"99999999": 1}},
        ),
        400,
        "logit_bias",
    )
