"""The Anthropic Messages API (/v1/messages), through the official anthropic SDK, against a real
server and model."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx
import jsonschema
import pytest

from server.runner import ServerThread
from server.runtime import Runtime
from tests.conftest import make_config

SMOL = "smollm2-135m-instruct.q4_1"
WEATHER = {
    "name": "get_weather",
    "description": "Current weather for a city",
    "input_schema": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 20},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city", "unit"],
    },
}
ASK: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
# This SDK has no sampling arguments (Anthropic dropped them for its newer models); the API
# still takes temperature, top_p and top_k, as extra body fields.
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def claude(agent_server: ServerThread) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=agent_server.url, api_key="unused", max_retries=0, timeout=600
    )


def test_create(claude: anthropic.Anthropic) -> None:
    m = claude.messages.create(
        model=SMOL,
        system="You are terse.",
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=12,
        extra_body=GREEDY,
    )
    assert m.type == "message" and m.role == "assistant" and m.model == SMOL
    assert m.content and m.content[0].type == "text" and m.content[0].text
    assert m.stop_reason in ("end_turn", "max_tokens")
    assert m.usage.input_tokens + (m.usage.cache_read_input_tokens or 0) > 5
    assert 0 < m.usage.output_tokens <= 12


def test_stop_sequence(claude: anthropic.Anthropic) -> None:
    m = claude.messages.create(
        model=SMOL,
        messages=[{"role": "user", "content": "Count from 1 to 20, separated by commas."}],
        max_tokens=60,
        extra_body=GREEDY,
        stop_sequences=["5"],
    )
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == "5", m.content
    assert m.content[0].type == "text" and "5" not in m.content[0].text


def test_stream(claude: anthropic.Anthropic) -> None:
    with claude.messages.stream(
        model=SMOL,
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=10,
        extra_body=GREEDY,
    ) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert kinds[1] == "content_block_start" and "content_block_delta" in kinds
    assert kinds[-3:-1] == ["content_block_stop", "message_delta"]
    assert final.content[0].type == "text" and final.content[0].text
    assert final.stop_reason in ("end_turn", "max_tokens") and final.usage.output_tokens > 0


def test_forced_tool_use_and_a_result_turn(claude: anthropic.Anthropic) -> None:
    m = claude.messages.create(
        model=SMOL,
        messages=ASK,
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "tool", "name": "get_weather"},
        max_tokens=80,
        extra_body=GREEDY,
    )
    assert m.stop_reason == "tool_use"
    [use] = [b for b in m.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.id.startswith("toolu_")
    jsonschema.validate(use.input, WEATHER["input_schema"])

    history = [
        *ASK,
        {"role": "assistant", "content": [b.model_dump() for b in m.content]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "18C"}],
        },
    ]
    reply = claude.messages.create(
        model=SMOL,
        messages=history,
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "none"},
        max_tokens=16,
        extra_body=GREEDY,
    )
    assert reply.content[0].type == "text" and reply.stop_reason in ("end_turn", "max_tokens")


def test_streamed_tool_use(claude: anthropic.Anthropic) -> None:
    with claude.messages.stream(
        model=SMOL,
        messages=ASK,
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
        max_tokens=80,
        extra_body=GREEDY,
    ) as stream:
        deltas = [e.delta.type for e in stream if e.type == "content_block_delta"]
        final = stream.get_final_message()
    assert deltas and set(deltas) == {"input_json_delta"}
    assert final.stop_reason == "tool_use"
    [use] = [b for b in final.content if b.type == "tool_use"]
    jsonschema.validate(use.input, WEATHER["input_schema"])


def test_thinking_blocks(claude: anthropic.Anthropic) -> None:
    m = claude.messages.create(
        model="smollm2-think",
        messages=[{"role": "user", "content": "Say hi."}],
        max_tokens=8,
        extra_body=GREEDY,
    )
    assert m.content[0].type == "thinking" and m.content[0].thinking
    hidden = claude.messages.create(
        model="smollm2-think",
        messages=[{"role": "user", "content": "Say hi."}],
        max_tokens=8,
        extra_body=GREEDY,
        thinking={"type": "disabled"},
    )
    assert all(b.type != "thinking" for b in hidden.content)


def test_structured_output(claude: anthropic.Anthropic) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}},
        "required": ["city"],
    }
    m = claude.messages.create(
        model=SMOL,
        messages=[{"role": "user", "content": "Name a city in France."}],
        output_config={"format": {"type": "json_schema", "schema": schema}},
        max_tokens=40,
        extra_body=GREEDY,
    )
    assert m.content[0].type == "text"
    jsonschema.validate(json.loads(m.content[0].text), schema)


def test_count_tokens(claude: anthropic.Anthropic) -> None:
    asked: dict[str, Any] = {
        "model": SMOL,
        "system": "You are terse.",
        "messages": [{"role": "user", "content": "Say hello."}],
    }
    counted = claude.messages.count_tokens(**asked).input_tokens
    m = claude.messages.create(**asked, max_tokens=1)
    assert counted == m.usage.input_tokens + (m.usage.cache_read_input_tokens or 0)
    with_tools = claude.messages.count_tokens(**asked, tools=[WEATHER]).input_tokens  # type: ignore[list-item]
    assert with_tools > counted  # the tools are described to the model


def test_errors_in_anthropic_shape(claude: anthropic.Anthropic, agent_server: ServerThread) -> None:
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(
            model=SMOL,
            messages=ASK,
            tools=[WEATHER],  # type: ignore[list-item]
            tool_choice={"type": "tool", "name": "nope"},
            max_tokens=5,
        )
    assert e.value.body["type"] == "error"  # type: ignore[index]
    assert e.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert "nope" in e.value.body["error"]["message"]  # type: ignore[index]

    with pytest.raises(anthropic.BadRequestError, match="tool_use_id"):
        claude.messages.create(
            model=SMOL,
            messages=[
                *ASK,
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": "toolu_x", "content": "1"}],
                },
            ],
            max_tokens=5,
        )
    with pytest.raises(anthropic.NotFoundError) as nf:
        claude.messages.create(model="no-such-model", messages=ASK, max_tokens=5)
    assert nf.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    r = httpx.post(agent_server.url + "/v1/messages", json={"model": SMOL, "messages": ASK})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in r.json()["error"]["message"]


def test_x_api_key_is_the_key() -> None:
    rt = Runtime(make_config(api_key="s3cret"))
    try:
        with ServerThread(rt) as srv:

            def ask(key: str) -> Any:
                c = anthropic.Anthropic(base_url=srv.url, api_key=key, max_retries=0)
                return c.messages.count_tokens(model=SMOL, messages=ASK)

            with pytest.raises(anthropic.AuthenticationError) as e:
                ask("wrong")
            assert e.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
            assert ask("s3cret").input_tokens > 5
    finally:
        rt.close()


def _events(r: httpx.Response) -> list[tuple[str, dict[str, Any]]]:
    out, kind = [], ""
    for line in r.iter_lines():
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            out.append((kind, json.loads(line[6:])))
    return out


# Claude Code's tools describe "any value" parameters by a description alone.
WORKFLOW = {
    "name": "Workflow",
    "description": "Run a named workflow script",
    "input_schema": {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "args": {"description": "Input passed to the script verbatim, any JSON value"},
        },
        "required": ["name", "args"],
        "additionalProperties": False,
    },
}


def test_a_claude_code_shaped_request(agent_server: ServerThread) -> None:
    """What Claude Code (2.1) sends, cut down: `?beta=true` and beta headers, system blocks
    with cache_control, a `system` turn in the middle of `messages`, a tool with an "any
    value" property, adaptive thinking, context_management, output_config.effort, metadata,
    a stream. lmx answered 400 to the system turn and to the tool's schema."""
    system_turn = {
        "role": "system",
        "content": [{"type": "text", "text": "Workflows available: deploy, test."}],
    }
    user_turn = {
        "role": "user",
        "content": [
            {
                "type": "text",
                "text": "Run the deploy workflow.",
                "cache_control": {"type": "ephemeral"},
            }
        ],
    }
    body: dict[str, Any] = {
        "model": SMOL,
        "system": [
            {"type": "text", "text": "You are a CLI agent.", "cache_control": {"type": "ephemeral"}}
        ],
        "messages": [user_turn, system_turn],
        "tools": [WORKFLOW],
        "metadata": {"user_id": '{"device_id": "d", "session_id": "s"}'},
        "thinking": {"type": "adaptive"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "output_config": {"effort": "high"},
        "max_tokens": 8,
        "stream": True,
    }
    headers = {
        "anthropic-version": "2023-06-01",
        "anthropic-beta": "claude-code-20250219,mid-conversation-system-2026-04-07",
        "x-app": "cli",
    }
    url = agent_server.url + "/v1/messages"
    with httpx.stream("POST", url + "?beta=true", json=body, headers=headers, timeout=600) as r:
        assert r.status_code == 200, r.read()
        events = [kind for kind, _ in _events(r)]
    assert events[0] == "message_start" and events[-1] == "message_stop"

    def count(messages: list[Any]) -> int:
        asked = {k: body[k] for k in ("model", "system", "tools")} | {"messages": messages}
        r = httpx.post(url + "/count_tokens", json=asked, headers=headers)
        assert r.status_code == 200, r.text
        return r.json()["input_tokens"]  # type: ignore[no-any-return]

    assert count([user_turn, system_turn]) > count([user_turn])  # the turn reaches the prompt

    forced = httpx.post(
        url,
        json={
            **body,
            "stream": False,
            "max_tokens": 80,
            "temperature": 0,
            "tool_choice": {"type": "tool", "name": "Workflow", "disable_parallel_tool_use": True},
        },
        headers=headers,
        timeout=600,
    )
    assert forced.status_code == 200, forced.text
    [use] = [b for b in forced.json()["content"] if b["type"] == "tool_use"]
    jsonschema.validate(use["input"], WORKFLOW["input_schema"])
