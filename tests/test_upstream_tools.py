"""Tool calls and thinking through an upstream model: lmx in front of a second lmx (the agent
server, whose models make the calls), asked in every dialect lmx speaks. What the upstream's
own template and parser make comes back unchanged, spelled in the caller's dialect."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import jsonschema
import ollama
import openai
import pytest

from server.runner import ServerThread
from server.runtime import Runtime
from tests.conftest import make_config
from tests.test_tool_calling import ASK, SMOL, WEATHER
from tests.test_tool_calling import WEATHER_SCHEMA as SCHEMA

VIA = "up/" + SMOL  # the agent server's SmolLM2, under the upstream's prefix
FN = WEATHER["function"]
NAMED: Any = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def front(
    agent_server: ServerThread, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerThread]:
    cfg = tmp_path_factory.mktemp("front-tools") / "lmx.toml"
    cfg.write_text(f'[upstreams.agents]\nurl = "{agent_server.url}"\nprefix = "up/"\n')
    rt = Runtime(make_config(cfg))
    with ServerThread(rt) as srv:
        yield srv
    rt.close()


def oai(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)


def test_openai_tool_calls_come_back_from_an_upstream(
    front: ServerThread, agent_server: ServerThread
) -> None:
    via, direct = oai(front.url), oai(agent_server.url)
    ask: dict[str, Any] = {
        "messages": ASK,
        "tools": [WEATHER],
        "tool_choice": NAMED,
        "max_tokens": 60,
        "temperature": 0,
    }
    a = via.chat.completions.create(model=VIA, **ask)
    b = direct.chat.completions.create(model=SMOL, **ask)
    assert a.choices[0].finish_reason == b.choices[0].finish_reason == "tool_calls"
    [call] = a.choices[0].message.tool_calls or []
    [want] = b.choices[0].message.tool_calls or []
    assert call.type == "function" and call.id.startswith("call_")
    # A named choice goes up as that one tool, `required` (the form every server reads): the
    # same call, though the upstream's grammar for it may space the JSON differently.
    assert call.function.name == want.function.name
    assert json.loads(call.function.arguments) == json.loads(want.function.arguments)
    jsonschema.validate(json.loads(call.function.arguments), SCHEMA)

    # Streamed: id and name first, then argument fragments that join to the same call.
    chunks = list(via.chat.completions.create(model=VIA, stream=True, **ask))
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert deltas[0].id and deltas[0].function and deltas[0].function.name == "get_weather"
    args = "".join(d.function.arguments or "" for d in deltas if d.function)
    assert args == call.function.arguments
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"

    # The result turn goes up with its call, and the upstream answers from it.
    turn: list[Any] = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"},
    ]
    ask = {"tools": [WEATHER], "max_tokens": 16, "temperature": 0, "tool_choice": "none"}
    a = via.chat.completions.create(model=VIA, messages=turn, **ask)
    b = direct.chat.completions.create(model=SMOL, messages=turn, **ask)
    assert a.choices[0].message.content == b.choices[0].message.content != ""
    assert not a.choices[0].message.tool_calls


def test_anthropic_responses_and_ollama_clients_call_tools_on_an_upstream(
    front: ServerThread, agent_server: ServerThread
) -> None:
    claude = anthropic.Anthropic(base_url=front.url, api_key="x", max_retries=0, timeout=600)
    m = claude.messages.create(
        model=VIA,
        messages=ASK,
        tools=[{"name": FN["name"], "description": FN["description"], "input_schema": SCHEMA}],
        tool_choice={"type": "tool", "name": "get_weather"},
        max_tokens=60,
        extra_body={"temperature": 0},
    )
    [use] = [b for b in m.content if b.type == "tool_use"]
    assert m.stop_reason == "tool_use" and use.name == "get_weather"
    jsonschema.validate(use.input, SCHEMA)

    r = oai(front.url).responses.create(
        model=VIA,
        input="What is the weather in Paris?",
        tools=[{"type": "function", **FN, "strict": False}],  # type: ignore[list-item]
        tool_choice="required",
        parallel_tool_calls=False,
        max_output_tokens=60,
        temperature=0,
    )
    [call] = [o for o in r.output if o.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments) == use.input

    # Ollama's client has no tool_choice: `auto`, so the model decides; through lmx it must
    # decide exactly as it does when asked directly. (SmolLM2 makes several calls and the limit
    # may cut the last one: asked directly, that one comes back as the model's text, through an
    # upstream as its arguments so far, which is all the upstream's stream carries of it; so the
    # text is compared for being there, not for its letters.)
    opts = {"temperature": 0, "num_predict": 200}
    a = ollama.Client(host=front.url, timeout=600).chat(
        model=VIA, messages=ASK, tools=[WEATHER], options=opts
    )
    b = ollama.Client(host=agent_server.url, timeout=600).chat(
        model=SMOL, messages=ASK, tools=[WEATHER], options=opts
    )
    assert a.done_reason == b.done_reason == "length"
    assert bool(a.message.content) == bool(b.message.content)
    assert a.message.tool_calls
    assert [(c.function.name, c.function.arguments) for c in a.message.tool_calls or []] == [
        (c.function.name, c.function.arguments) for c in b.message.tool_calls or []
    ]


def test_thinking_comes_back_from_an_upstream(
    front: ServerThread, agent_server: ServerThread
) -> None:
    """The upstream splits the thinking (its R1-style template); lmx passes it on as thinking,
    not as answer text. The grammar (llama.cpp's extension) goes up too."""
    ask: dict[str, Any] = {
        "messages": [{"role": "user", "content": "Say hi."}],
        "max_tokens": 40,
        "temperature": 0,
        "extra_body": {"grammar": 'root ::= [a-z]+ " " [a-z]+ "</think>" [A-Z] [a-z]+'},
    }
    a = oai(front.url).chat.completions.create(model="up/smollm2-think", **ask)
    b = oai(agent_server.url).chat.completions.create(model="smollm2-think", **ask)
    got, want = a.choices[0].message.model_dump(), b.choices[0].message.model_dump()
    assert got["reasoning_content"] == want["reasoning_content"] != ""
    assert got["content"] == want["content"] and "</think>" not in got["content"]
