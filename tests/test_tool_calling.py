"""Tool calling, reasoning and token endpoints on /v1 and /api, through the official openai and
ollama clients, against a real server and the real models."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import ollama
import openai
import pytest

from server.grammar import MAX_PARALLEL_CALLS, json_grammar
from server.runner import ServerThread

SMOL = "smollm2-135m-instruct.q4_1"
HERMES_MODEL = "smollm2-hermes"
GEMMA = "gemma-3-270m"
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": WEATHER_SCHEMA,
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The local time in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"],
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(agent_server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=agent_server.url + "/v1", api_key="unused", max_retries=0, timeout=600
    )


def hermes_grammar() -> str:
    """The Hermes call format for get_weather, so that even a 135M model writes it: the
    model-side half of the `auto` round trip (sent as llama.cpp's `grammar` extension)."""
    call = {
        "type": "object",
        "properties": {"name": {"const": "get_weather"}, "arguments": WEATHER_SCHEMA},
        "required": ["name", "arguments"],
    }
    body = json_grammar(call).replace("root ::=", "call ::=")
    return body + '\nroot ::= "<tool_call>\\n" call "\\n</tool_call>"'


def check_weather_call(call: Any) -> dict[str, Any]:
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, WEATHER_SCHEMA)
    return args  # type: ignore[no-any-return]


# ----- OpenAI chat ----------------------------------------------------------------------------


@pytest.mark.parametrize("choice", ["named", "required"])
def test_forced_call_gives_schema_valid_arguments(client: openai.OpenAI, choice: str) -> None:
    tool_choice: Any = (
        {"type": "function", "function": {"name": "get_weather"}}
        if choice == "named"
        else "required"
    )
    r = client.chat.completions.create(
        model=SMOL,
        messages=ASK,  # type: ignore[arg-type]
        tools=[WEATHER, TIME],  # type: ignore[list-item]
        tool_choice=tool_choice,
        parallel_tool_calls=False,
        max_tokens=80,
        temperature=0,
    )
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    assert c.message.tool_calls is not None and len(c.message.tool_calls) == 1
    call = c.message.tool_calls[0]
    if choice == "named":
        check_weather_call(call)
    else:
        assert call.function.name in ("get_weather", "get_time")
        json.loads(call.function.arguments)


def test_forced_call_on_gemma(client: openai.OpenAI) -> None:
    """The second architecture (262k vocabulary, llama.cpp's built-in template)."""
    r = client.chat.completions.create(
        model=GEMMA,
        messages=ASK,  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=60,
        temperature=0,
    )
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.tool_calls
    check_weather_call(c.message.tool_calls[0])


def test_streamed_call_deltas_reassemble(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=SMOL,
        messages=ASK,  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=80,
        temperature=0,
        stream=True,
    )
    calls: dict[int, dict[str, Any]] = {}
    finish = []
    fragments = 0
    for chunk in stream:
        for choice in chunk.choices:
            if choice.finish_reason:
                finish.append(choice.finish_reason)
            for tc in choice.delta.tool_calls or []:
                fn = tc.function
                if tc.index not in calls:  # the first delta of a call: its id and name
                    assert tc.id and fn is not None and fn.name == "get_weather"
                    calls[tc.index] = {"id": tc.id, "arguments": fn.arguments or ""}
                else:
                    assert tc.id is None and fn is not None and fn.arguments
                    calls[tc.index]["arguments"] += fn.arguments
                    fragments += 1
    assert finish == ["tool_calls"] and list(calls) == [0] and fragments > 1
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER_SCHEMA)


def test_a_tool_result_turn(client: openai.OpenAI, agent_server: ServerThread) -> None:
    first = client.chat.completions.create(
        model=SMOL,
        messages=ASK,  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="required",
        max_tokens=80,
        temperature=0,
    )
    msg = first.choices[0].message
    assert msg.tool_calls
    history = [
        *ASK,
        msg.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": "18C and sunny"},
    ]
    # The template (which knows no tools) gets the call and its result as text turns.
    prompt = httpx.post(
        agent_server.url + "/apply-template",
        json={"model": SMOL, "messages": history, "tools": [WEATHER]},
    ).json()["prompt"]
    assert "18C and sunny" in prompt and '"get_weather"' in prompt
    second = client.chat.completions.create(
        model=SMOL,
        messages=history,  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="none",
        max_tokens=24,
        temperature=0,
    )
    c = second.choices[0]
    assert c.message.content and not c.message.tool_calls
    assert c.finish_reason in ("stop", "length")


def test_parallel_forced_calls_are_bounded(client: openai.OpenAI) -> None:
    """`required` with parallel calls allowed (every client's default): a small model at
    temperature 0 repeats the same call, and an unbounded grammar let it do so until
    max_tokens (or the whole context: minutes). The grammar ends the reply after
    MAX_PARALLEL_CALLS calls."""
    r = client.chat.completions.create(
        model=SMOL,
        messages=ASK,  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="required",
        max_tokens=400,
        temperature=0,
    )
    c = r.choices[0]
    assert c.finish_reason == "tool_calls", (c.finish_reason, c.message)
    assert c.message.tool_calls and len(c.message.tool_calls) <= MAX_PARALLEL_CALLS
    assert r.usage is not None and r.usage.completion_tokens < 400
    for call in c.message.tool_calls:
        check_weather_call(call)


def test_tool_choice_none_answers_in_text(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=SMOL,
        messages=ASK,  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="none",
        max_tokens=16,
        temperature=0,
    )
    c = r.choices[0]
    assert c.message.content and c.message.tool_calls is None
    assert c.finish_reason in ("stop", "length")


def test_auto_without_tool_support(client: openai.OpenAI) -> None:
    """SmolLM2's template knows no tools: `auto` holds the reply to a call or an answer, and
    either way the client gets valid calls or plain text, never the JSON envelope."""
    r = client.chat.completions.create(
        model=SMOL,
        messages=ASK,  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
        parallel_tool_calls=False,
        max_tokens=60,
        temperature=0,
    )
    c = r.choices[0]
    if c.message.tool_calls:
        assert c.finish_reason == "tool_calls"
        json.loads(c.message.tool_calls[0].function.arguments)
    else:
        assert c.message.content and not c.message.content.startswith('{"response"')


def test_auto_round_trips_a_hermes_tool_call(
    client: openai.OpenAI, agent_server: ServerThread
) -> None:
    """A model configured with a tool-aware template: the tools go through the template, the
    model's `<tool_call>` is parsed (streamed and not), and the result goes back through the
    template's own `<tool_response>`."""
    prompt = httpx.post(
        agent_server.url + "/apply-template",
        json={"model": HERMES_MODEL, "messages": ASK, "tools": [WEATHER]},
    ).json()["prompt"]
    assert "<tools>" in prompt and '"name": "get_weather"' in prompt
    asked: dict[str, Any] = {
        "model": HERMES_MODEL,
        "messages": ASK,
        "tools": [WEATHER],
        "max_tokens": 60,
        "temperature": 0,
        "extra_body": {"grammar": hermes_grammar()},
    }
    r = client.chat.completions.create(**asked)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.tool_calls, c.message.content
    args = check_weather_call(c.message.tool_calls[0])
    assert not c.message.content

    names, arguments = [], ""
    for chunk in client.chat.completions.create(**asked, stream=True):
        for tc in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
            if tc.function and tc.function.name:
                names.append(tc.function.name)
            arguments += (tc.function.arguments or "") if tc.function else ""
    assert names == ["get_weather"] and json.loads(arguments) == args

    history = [
        *ASK,
        c.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": c.message.tool_calls[0].id, "content": "18C, sunny"},
    ]
    again = httpx.post(
        agent_server.url + "/apply-template",
        json={"model": HERMES_MODEL, "messages": history, "tools": [WEATHER]},
    ).json()["prompt"]
    assert '<tool_call>\n{"name": "get_weather", "arguments": ' in again
    assert "<tool_response>\n18C, sunny\n</tool_response>" in again
    final = client.chat.completions.create(
        model=HERMES_MODEL, messages=history, tools=[WEATHER], max_tokens=16, temperature=0
    )
    assert final.choices[0].message.content or final.choices[0].message.tool_calls


def _error(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    return err  # type: ignore[no-any-return]


def test_bad_tool_requests_are_openai_400s(agent_server: ServerThread) -> None:
    url = agent_server.url + "/v1/chat/completions"
    base = {"model": SMOL, "messages": ASK, "max_tokens": 5}
    err = _error(
        httpx.post(
            url,
            json={
                **base,
                "tools": [WEATHER],
                "tool_choice": {"type": "function", "function": {"name": "nope"}},
            },
        )
    )
    assert "nope" in err["message"] and err["param"] == "tool_choice"
    bad_schema = {
        "type": "function",
        "function": {"name": "f", "parameters": {"type": "object", "properties": 5}},
    }
    err = _error(httpx.post(url, json={**base, "tools": [bad_schema]}))
    assert "Invalid schema for function 'f'" in err["message"]
    err = _error(
        httpx.post(
            url,
            json={
                **base,
                "messages": [*ASK, {"role": "tool", "tool_call_id": "call_x", "content": "1"}],
            },
        )
    )
    assert "call_x" in err["message"]
    err = _error(
        httpx.post(
            url,
            json={**base, "tools": [WEATHER], "response_format": {"type": "json_object"}},
        )
    )
    assert err["param"] == "response_format"
    err = _error(httpx.post(url, json={**base, "tool_choice": "required"}))
    assert "tools" in err["message"]


# ----- reasoning ------------------------------------------------------------------------------

THINK_GRAMMAR = 'root ::= [a-z]+ " " [a-z]+ "</think>" [A-Z] [a-z]+'


def test_reasoning_is_split_out(client: openai.OpenAI) -> None:
    """An R1-style template opens a thinking block; what the model thinks comes back as
    `reasoning_content` (and `reasoning`), the rest as content, streamed and not."""
    asked: dict[str, Any] = {
        "model": "smollm2-think",
        "messages": [{"role": "user", "content": "Say hi."}],
        "max_tokens": 40,
        "temperature": 0,
        "extra_body": {"grammar": THINK_GRAMMAR},
    }
    r = client.chat.completions.create(**asked)
    msg = r.choices[0].message.model_dump()
    assert msg["content"] and "</think>" not in msg["content"]
    assert msg["reasoning_content"] and msg["reasoning"] == msg["reasoning_content"]
    assert " " in msg["reasoning_content"]
    reasoning, content = "", ""
    for chunk in client.chat.completions.create(**asked, stream=True):
        if chunk.choices:
            d = chunk.choices[0].delta.model_dump()
            reasoning += d.get("reasoning_content") or ""
            content += d.get("content") or ""
    assert (reasoning, content) == (msg["reasoning_content"], msg["content"])


def test_reasoning_setting_off_keeps_the_text(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="smollm2-think-raw",  # `reasoning = false` in its [models."id"]
        messages=[{"role": "user", "content": "Say hi."}],
        max_tokens=40,
        temperature=0,
        extra_body={"grammar": THINK_GRAMMAR},
    )
    msg = r.choices[0].message.model_dump()
    assert "</think>" in msg["content"] and not msg.get("reasoning_content")


# ----- Ollama ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ollama_client(agent_server: ServerThread) -> ollama.Client:
    return ollama.Client(host=agent_server.url, timeout=600)


def test_ollama_tools(ollama_client: ollama.Client, agent_server: ServerThread) -> None:
    """Ollama's shape: arguments as an object, results as `role: tool` with `tool_name`; and
    lmx's `tool_choice` (Ollama ignores it) forces a call."""
    r = httpx.post(
        agent_server.url + "/api/chat",
        json={
            "model": SMOL,
            "messages": ASK,
            "tools": [WEATHER],
            "tool_choice": "required",
            "stream": False,
            "options": {"temperature": 0, "num_predict": 80},
        },
        timeout=600,
    ).json()
    calls = r["message"]["tool_calls"]  # (parallel calls allowed: one or more)
    assert calls and r["done_reason"] in ("stop", "length")
    for call in calls:
        assert call["function"]["name"] == "get_weather"
        jsonschema.validate(call["function"]["arguments"], WEATHER_SCHEMA)

    reply = ollama_client.chat(
        model=SMOL,
        messages=[
            *ASK,
            r["message"],
            {"role": "tool", "content": "18C", "tool_name": "get_weather"},
        ],
        tools=[WEATHER],
        options={"temperature": 0, "num_predict": 40},
    )
    assert reply.message.content or reply.message.tool_calls
    for tc in reply.message.tool_calls or []:
        assert isinstance(tc.function.arguments, dict)


def test_ollama_streams_tool_calls_whole(ollama_client: ollama.Client) -> None:
    parts = list(
        ollama_client.chat(
            model=HERMES_MODEL,
            messages=ASK,
            tools=[WEATHER],
            stream=True,
            options={"temperature": 0, "num_predict": 60},
        )
    )
    assert parts[-1].done
    for p in parts:
        for tc in p.message.tool_calls or []:
            jsonschema.validate(tc.function.arguments, WEATHER_SCHEMA)


def test_ollama_stream_keeps_a_call_the_limit_broke_off(ollama_client: ollama.Client) -> None:
    """SmolLM2 makes calls until the limit cuts one: streamed, the reply is what the whole one
    is (complete calls as calls, the broken one as text), not the calls alone."""
    ask: dict[str, Any] = {
        "model": SMOL,
        "messages": ASK,
        "tools": [WEATHER],
        "options": {"temperature": 0, "num_predict": 120},
    }
    whole = ollama_client.chat(**ask)
    parts = list(ollama_client.chat(**ask, stream=True))
    assert whole.done_reason == parts[-1].done_reason == "length"
    assert whole.message.tool_calls and whole.message.content  # the broken call's text
    assert "".join(p.message.content or "" for p in parts) == whole.message.content
    assert [tc for p in parts for tc in p.message.tool_calls or []] == whole.message.tool_calls


def test_ollama_think(ollama_client: ollama.Client, agent_server: ServerThread) -> None:
    body = {
        "model": "smollm2-think",
        "messages": [{"role": "user", "content": "Say hi."}],
        "stream": False,
        "think": True,
        "options": {"temperature": 0, "num_predict": 12},
    }
    r = httpx.post(agent_server.url + "/api/chat", json=body, timeout=600).json()
    assert r["message"]["thinking"]
    r = httpx.post(agent_server.url + "/api/chat", json={**body, "think": False}, timeout=600)
    assert "thinking" not in r.json()["message"]
    streamed = ollama_client.chat(
        model="smollm2-think",
        messages=body["messages"],  # type: ignore[arg-type]
        think=True,
        stream=True,
        options={"temperature": 0, "num_predict": 12},
    )
    assert "".join(p.message.thinking or "" for p in streamed)


def test_ollama_capabilities(ollama_client: ollama.Client) -> None:
    assert "tools" in (ollama_client.show(HERMES_MODEL).capabilities or [])
    assert "thinking" in (ollama_client.show("smollm2-think").capabilities or [])
    plain = ollama_client.show(SMOL).capabilities or []
    assert "tools" not in plain and "thinking" not in plain and "completion" in plain


def test_ollama_bad_tools(agent_server: ServerThread) -> None:
    r = httpx.post(
        agent_server.url + "/api/chat",
        json={"model": SMOL, "messages": ASK, "tools": [{"function": {"name": "a b"}}]},
    )
    assert r.status_code == 400 and "name" in r.json()["error"]


# ----- tokens ---------------------------------------------------------------------------------


def test_tokenize_detokenize_apply_template(agent_server: ServerThread) -> None:
    url = agent_server.url
    text = "Hello world, hello lmx."
    tokens = httpx.post(url + "/tokenize", json={"model": SMOL, "content": text}).json()
    assert tokens["model"] == SMOL and all(isinstance(t, int) for t in tokens["tokens"])
    back = httpx.post(url + "/detokenize", json={"model": SMOL, "tokens": tokens["tokens"]})
    assert back.json()["content"] == text
    pieces = httpx.post(
        url + "/tokenize", json={"model": SMOL, "content": text, "with_pieces": True}
    ).json()["tokens"]
    assert "".join(p["piece"] for p in pieces) == text
    assert [p["id"] for p in pieces] == tokens["tokens"]

    applied = httpx.post(url + "/apply-template", json={"model": SMOL, "messages": ASK}).json()
    assert applied["prompt"].endswith("<|im_start|>assistant\n")
    usage = httpx.post(
        url + "/v1/chat/completions", json={"model": SMOL, "messages": ASK, "max_tokens": 1}
    ).json()["usage"]
    assert usage["prompt_tokens"] == applied["tokens"]

    bad = httpx.post(url + "/detokenize", json={"model": SMOL, "tokens": [10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def _lines(r: httpx.Response) -> Iterator[dict[str, Any]]:
    for line in r.iter_lines():
        if line:
            yield json.loads(line)
