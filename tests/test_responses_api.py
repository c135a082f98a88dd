"""The OpenAI Responses API (/v1/responses), through the official openai SDK, against a real
server and model; and the bounded store behind previous_response_id."""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from server.api.responses import ResponseStore
from server.runner import ServerThread

SMOL = "smollm2-135m-instruct.q4_1"
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather for a city",
    "parameters": WEATHER_SCHEMA,
    "strict": True,
}


@pytest.fixture(scope="module")
def client(agent_server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=agent_server.url + "/v1", api_key="unused", max_retries=0, timeout=600
    )


def test_plain(client: openai.OpenAI) -> None:
    r = client.responses.create(
        model=SMOL,
        instructions="You are terse.",
        input="Say hello.",
        max_output_tokens=12,
        temperature=0,
    )
    assert r.object == "response" and r.id.startswith("resp_") and r.model == SMOL
    assert r.status in ("completed", "incomplete") and r.output_text
    assert r.output[0].type == "message" and r.output[0].role == "assistant"
    assert r.usage is not None and r.usage.input_tokens > 5 and 0 < r.usage.output_tokens <= 12
    if r.status == "incomplete":
        assert r.incomplete_details and r.incomplete_details.reason == "max_output_tokens"
    assert client.responses.retrieve(r.id).output_text == r.output_text


def test_cut_off_by_the_limit_is_incomplete_to_the_last_item(client: openai.OpenAI) -> None:
    r = client.responses.create(
        model=SMOL, input="Tell me a long story about the sea.", max_output_tokens=3
    )
    assert r.status == "incomplete" and r.incomplete_details
    assert r.incomplete_details.reason == "max_output_tokens"
    assert r.output[-1].status == "incomplete"  # the message was cut off too
    assert r.tool_choice == "auto" and r.tools == []  # unset, echoed as OpenAI does
    events = list(
        client.responses.create(
            model=SMOL,
            input="Tell me a long story about the sea.",
            max_output_tokens=3,
            stream=True,
        )
    )
    done = [e.item.status for e in events if e.type == "response.output_item.done"]
    final = events[-1].response  # type: ignore[union-attr]
    assert events[-1].type == "response.incomplete"
    assert done == ["incomplete"] and final.status == "incomplete"
    assert [i.status for i in final.output] == ["incomplete"]
    assert client.responses.retrieve(final.id).output[-1].status == "incomplete"


def test_streamed(client: openai.OpenAI) -> None:
    stream = client.responses.create(
        model=SMOL, input="Say hello.", max_output_tokens=10, temperature=0, stream=True
    )
    events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed" if kinds[-1] == "response.completed" else "response.incomplete",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response  # type: ignore[union-attr]
    assert text and final.output_text == text
    assert client.responses.retrieve(final.id).output_text == text


def test_function_tool_and_previous_response_id(client: openai.OpenAI) -> None:
    first = client.responses.create(
        model=SMOL,
        input="What is the weather in Paris?",
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="required",
        parallel_tool_calls=False,
        max_output_tokens=80,
        temperature=0,
    )
    [call] = [o for o in first.output if o.type == "function_call"]
    assert call.name == "get_weather" and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), WEATHER_SCHEMA)

    second = client.responses.create(
        model=SMOL,
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "18C"}],
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="none",
        max_output_tokens=16,
        temperature=0,
    )
    assert second.previous_response_id == first.id and second.output_text
    # The whole conversation went to the model: the question, the call (its JSON) and the
    # result, more than the question alone.
    alone = client.responses.create(
        model=SMOL,
        input="What is the weather in Paris?",
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="none",
        max_output_tokens=1,
    )
    assert second.usage and alone.usage
    assert second.usage.input_tokens > alone.usage.input_tokens + 15


def test_streamed_function_call(client: openai.OpenAI) -> None:
    events = list(
        client.responses.create(
            model=SMOL,
            input="What is the weather in Paris?",
            tools=[WEATHER],  # type: ignore[list-item]
            tool_choice={"type": "function", "name": "get_weather"},
            max_output_tokens=80,
            temperature=0,
            stream=True,
        )
    )
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    [done] = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert done.arguments == args
    jsonschema.validate(json.loads(args), WEATHER_SCHEMA)
    final = events[-1]
    assert final.type == "response.completed"
    assert [o.type for o in final.response.output] == ["function_call"]


def test_json_schema_format(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}},
        "required": ["city"],
        "additionalProperties": False,
    }
    r = client.responses.create(
        model=SMOL,
        input="Name a city in France.",
        text={"format": {"type": "json_schema", "name": "city", "schema": schema}},
        max_output_tokens=40,
        temperature=0,
    )
    jsonschema.validate(json.loads(r.output_text), schema)


def test_get_delete_and_unknown_ids(client: openai.OpenAI, agent_server: ServerThread) -> None:
    r = client.responses.create(model=SMOL, input="Hi", max_output_tokens=3)
    assert client.responses.retrieve(r.id).id == r.id
    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.retrieve(r.id)
    assert r.id in e.value.message
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(
            model=SMOL, previous_response_id=r.id, input="Go on", max_output_tokens=3
        )
    body: Any = e.value.body
    assert body["param"] == "previous_response_id" and r.id in body["message"]

    url = agent_server.url + "/v1/responses"
    bad = httpx.post(
        url,
        json={
            "model": SMOL,
            "input": [{"type": "function_call_output", "call_id": "call_x", "output": "1"}],
        },
    )
    assert bad.status_code == 400 and "call_x" in bad.json()["error"]["message"]
    unstored = client.responses.create(model=SMOL, input="Hi", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_the_store_is_bounded() -> None:
    store = ResponseStore(max_count=3, max_bytes=2000)
    for i in range(5):
        store.put(f"r{i}", {"id": f"r{i}"}, [{"role": "user", "content": "x"}])
    assert len(store) == 3 and store.get("r0") is None and store.get("r4") is not None
    store.get("r2")  # used: now the most recent
    store.put("r5", {"id": "r5"}, [])
    assert store.get("r3") is None and store.get("r2") is not None
    store.put("big", {"id": "big"}, [{"role": "user", "content": "x" * 1950}])
    assert store.bytes <= 2000 and store.get("big") is not None and len(store) == 1
    store.put("huge", {"id": "huge"}, [{"role": "user", "content": "x" * 5000}])
    assert store.get("huge") is None and store.bytes <= 2000
    assert store.delete("big") and not store.delete("big")


def test_bad_tool_choice_is_a_400_in_the_responses_shape(agent_server: ServerThread) -> None:
    """The error names the function that is not in `tools`, and for a shape lmx does not take
    it shows the Responses API's own named choice (not Chat Completions' nested one)."""
    url = agent_server.url + "/v1/responses"
    base = {"model": SMOL, "input": "Weather in Paris?", "tools": [WEATHER]}
    for choice, says in [
        ({"type": "function", "name": "nope"}, "'nope'"),
        ({"type": "function"}, "name"),
        ("any", "'any'"),
        (
            {"type": "allowed_tools", "mode": "required", "tools": []},
            '{"type": "function", "name": ...}',
        ),
    ]:
        r = httpx.post(url, json={**base, "tool_choice": choice})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["param"] == "tool_choice"
        assert says in err["message"], (choice, err["message"])
