"""Forced tool calls on the real models: the grammar makes any model's arguments valid.

Each model gets the prompt `plan_tool_calls` builds for it (SmolLM2's template and Gemma's
llama.cpp built-in one know no tools), samples under the plan's grammar, and the plan's parser
reads the reply back; the arguments must validate against the tool's schema.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from server.chat_output import ChatOutput, ChatOutputParser, collect_output
from server.discovery import describe_file
from server.engines.base import EngineOptions, GenerationRequest, SamplingParams, collect
from server.engines.llamacpp import LlamaCppEngine
from server.grammar import json_grammar
from server.toolcalls import (
    AUTO,
    REQUIRED,
    ToolChoice,
    ToolSpec,
    parse_tools,
    plan_tool_calls,
)
from tests.chat_templates import HERMES

TOOLS = parse_tools(
    [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Current weather for a city",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "city": {"type": "string", "maxLength": 30},
                        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                    },
                    "required": ["city", "unit"],
                },
            },
        },
        {
            "type": "function",
            "function": {
                "name": "book_trip",
                "description": "Book a trip for one traveler",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "traveler": {
                            "type": "object",
                            "properties": {
                                "name": {"type": "string", "maxLength": 20},
                                "age": {"type": "integer"},
                            },
                            "required": ["name", "age"],
                        },
                        "stops": {
                            "type": "array",
                            "items": {"type": "string", "maxLength": 15},
                            "minItems": 1,
                            "maxItems": 3,
                        },
                        "budget": {"type": "number"},
                        "refundable": {"type": "boolean"},
                        "class": {"type": "string", "enum": ["economy", "business"]},
                    },
                    "required": ["traveler", "stops", "budget", "class"],
                },
            },
        },
        {
            "type": "function",
            "function": {
                "name": "schedule",
                "description": "Put a meeting in the calendar",
                "parameters": {
                    "type": "object",
                    "$defs": {
                        "Time": {
                            "type": "object",
                            "properties": {
                                "hour": {"type": "integer", "enum": [9, 10, 11, 14]},
                                "minute": {"type": "integer", "enum": [0, 30]},
                            },
                            "required": ["hour", "minute"],
                        }
                    },
                    "properties": {
                        "title": {"type": "string", "maxLength": 25},
                        "start": {"$ref": "#/$defs/Time"},
                        "end": {"$ref": "#/$defs/Time"},
                    },
                    "required": ["title", "start", "end"],
                },
            },
        },
        {
            "type": "function",
            "function": {
                "name": "set_alarm",
                "description": "Set an alarm",
                "parameters": {
                    "type": "object",
                    # The same $defs name as `schedule`, another shape: rules must not mix.
                    "$defs": {"Time": {"type": "string", "enum": ["morning", "evening"]}},
                    "properties": {"when": {"$ref": "#/$defs/Time"}},
                    "required": ["when"],
                },
            },
        },
    ]
)
SCHEMAS = {t.name: t.parameters for t in TOOLS}
QUESTION = (
    "Book Ann (31) a business trip to Rome then Paris for 900 euros, check the weather in "
    "Rome, set a morning alarm and schedule a kickoff meeting from 9:00 to 10:30."
)


def load(path: Path, model_id: str, **options: Any) -> Iterator[LlamaCppEngine]:
    engine = LlamaCppEngine(
        describe_file(model_id, path, "test"),
        EngineOptions(n_ctx=1536, parallel=4, threads=2, **options),
    )
    engine.load()
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def smollm2(smollm2_path: Path) -> Iterator[LlamaCppEngine]:
    yield from load(smollm2_path, "smollm2")


@pytest.fixture(scope="module")
def gemma(gemma_path: Path) -> Iterator[LlamaCppEngine]:
    yield from load(gemma_path, "gemma")


def ask(
    engine: LlamaCppEngine, choices: list[ToolChoice], *, parallel: bool = False
) -> list[tuple[ChatOutput, str, str]]:
    """Each choice as its own request, all decoded in one batch: (parsed reply, raw text,
    finish reason)."""
    plans = [
        plan_tool_calls(TOOLS, c, parallel=parallel, template=engine.chat_template) for c in choices
    ]
    requests = [
        GenerationRequest(
            engine.format_chat(
                p.prepare_messages([{"role": "user", "content": QUESTION}]),
                tools=p.template_tools,
            ),
            max_tokens=200,
            sampling=SamplingParams(temperature=0.0),
            grammar=p.grammar,
        )
        for p in plans
    ]
    results: list[Any] = [None] * len(requests)

    def one(i: int) -> None:
        results[i] = collect(engine, requests[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    out = []
    for plan, (text, fin) in zip(plans, results, strict=True):
        parsed = ChatOutputParser(tools=plan.new_parser()).parse(text)
        out.append((parsed, text, fin.reason))
    return out


def check_valid(out: ChatOutput, text: str, reason: str, expect: str | None) -> None:
    assert reason == "stop", text  # the grammar ended the reply, not max_tokens
    assert out.content == "" and out.tool_calls, text
    for call in out.tool_calls:
        assert expect is None or call.name == expect
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("model", ["smollm2", "gemma"])
def test_forced_calls_give_schema_valid_arguments(
    model: str, request: pytest.FixtureRequest
) -> None:
    engine: LlamaCppEngine = request.getfixturevalue(model)
    named = ["book_trip", "schedule", "set_alarm"]
    choices = [ToolChoice("function", n) for n in named] + [REQUIRED]
    results = ask(engine, choices)
    for (out, text, reason), expect in zip(results, [*named, None], strict=True):
        check_valid(out, text, reason, expect)
        assert len(out.tool_calls) == 1  # parallel calls were not allowed


@pytest.mark.timeout(1200)
def test_auto_without_tool_support_answers_in_the_generic_shape(
    smollm2: LlamaCppEngine,
) -> None:
    """SmolLM2's template knows no tools: under `auto` the grammar keeps the reply to a call
    or a `response`, and either way the parser returns valid calls or plain text."""
    [(out, text, reason)] = ask(smollm2, [AUTO], parallel=True)
    assert reason == "stop" and text.lstrip().startswith("{")
    assert out.content or out.tool_calls
    for call in out.tool_calls:
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])


def hermes_grammar(tool: ToolSpec) -> str:
    """A grammar for the Hermes format (`<tool_call>\\n{...}\\n</tool_call>`), so that even a
    135M model writes it: the model-side half of the `auto` round trip."""
    call_schema = {
        "type": "object",
        "properties": {"name": {"const": tool.name}, "arguments": tool.parameters},
        "required": ["name", "arguments"],
    }
    body = json_grammar(call_schema).replace("root ::=", "call ::=")
    return body + '\nroot ::= "<tool_call>\\n" call "\\n</tool_call>"'


@pytest.mark.timeout(1200)
def test_auto_round_trips_a_tool_call_through_a_hermes_template(smollm2_path: Path) -> None:
    """A model configured with a tool-aware template (a per-model chat_template override):
    the tools go through its template, its `<tool_call>` reply is parsed back, in chunks."""
    for engine in load(smollm2_path, "smollm2-hermes", chat_template=HERMES):
        plan = plan_tool_calls(TOOLS, AUTO, template=engine.chat_template)
        assert plan.parse_format == "hermes" and plan.grammar is None
        messages = plan.prepare_messages([{"role": "user", "content": QUESTION}])
        prompt = engine.render_chat(messages, tools=plan.template_tools)
        assert "<tools>" in prompt and '"name": "get_weather"' in prompt
        weather = TOOLS[0]
        text, fin = collect(
            engine,
            GenerationRequest(
                engine.format_chat(messages, tools=plan.template_tools),
                max_tokens=120,
                sampling=SamplingParams(temperature=0.0),
                grammar=hermes_grammar(weather),
            ),
        )
        assert fin.reason == "stop" and text.startswith("<tool_call>"), text
        for size in (1, 3, 7, len(text)):
            parser = ChatOutputParser(tools=plan.new_parser())
            events = [e for i in range(0, len(text), size) for e in parser.feed(text[i : i + size])]
            out = collect_output(events + parser.finish())
            assert out.content == "" and [c.name for c in out.tool_calls] == ["get_weather"]
            jsonschema.validate(json.loads(out.tool_calls[0].arguments), weather.parameters)
