"""Tool calling without a model: tool definitions, tool_choice, formats, parsers, history."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Collection
from pathlib import Path
from typing import Any

import pytest

from server.chat_output import (
    ChatOutput,
    ChatOutputParser,
    ContentDelta,
    OutputEvent,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
    collect_output,
)
from server.chat_template import ChatTemplate
from server.discovery import describe_file
from server.errors import InvalidRequest
from server.toolcall_parsers import JsonScanner, tool_call_parser
from server.toolcalls import (
    AUTO,
    NONE,
    REQUIRED,
    ToolChoice,
    detect_tool_format,
    messages_for_template,
    parse_anthropic_tool_choice,
    parse_anthropic_tools,
    parse_responses_tools,
    parse_tool_choice,
    parse_tools,
    plan_tool_calls,
    template_takes_tools,
    with_system_text,
)
from tests.chat_templates import HERMES, LLAMA3, MISTRAL, QWEN3_CODER

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
        },
    },
}
NAMES = ("get_weather", "add")
CALL_ID = re.compile(r"call_[A-Za-z0-9]{24}")


@pytest.fixture(scope="module")
def smol_template(smollm2_path: Path) -> str:
    source = describe_file("m", smollm2_path, "test").chat_template
    assert source is not None
    return source


# ----- tools and tool_choice --------------------------------------------------------------


def test_openai_and_ollama_tools() -> None:
    tools = parse_tools([WEATHER, {"function": {"name": "now"}}])  # Ollama may omit the type
    assert [t.name for t in tools] == ["get_weather", "now"]
    assert tools[0].description == "Current weather for a city"
    assert tools[1].parameters == {"type": "object", "properties": {}}
    assert tools[0].openai() == WEATHER
    assert parse_tools(None) == []


def fn(name: Any = "f", parameters: Any = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"name": name, **extra}
    if parameters is not None:
        body["parameters"] = parameters
    return {"type": "function", "function": body}


@pytest.mark.parametrize(
    ("tools", "message", "param"),
    [
        ({"type": "function"}, "must be an array", "tools"),
        (["x"], "must be an object", "tools[0]"),
        ([{"type": "retrieval"}], "Unsupported tool type 'retrieval'", "tools[0].type"),
        ([{"type": "function"}], "Missing required parameter: 'tools[0].function'", None),
        ([fn("get weather")], "Invalid tool name", "tools[0].function.name"),
        ([fn("")], "Invalid tool name", "tools[0].function.name"),
        ([fn("x" * 65)], "Invalid tool name", "tools[0].function.name"),
        ([fn(description=3)], "description must be a string", None),
        (
            [fn(parameters={"type": "object", "properties": {"a": {"type": "strin"}}})],
            "Invalid schema for function 'f'",
            "tools[0].function.parameters",
        ),
        ([fn(parameters={"type": "string"})], "'type: \"object\"', got 'type: \"string\"'", None),
        ([fn(parameters=[1])], "must be a JSON Schema object", None),
        ([fn("a"), fn("a")], "Duplicate tool name 'a'", "tools"),
    ],
)
def test_invalid_tools_are_400s_naming_the_field(
    tools: Any, message: str, param: str | None
) -> None:
    with pytest.raises(InvalidRequest, match=re.escape(message)) as err:
        parse_tools(tools)
    assert err.value.status == 400 and err.value.type == "invalid_request_error"
    assert err.value.param == (param or err.value.param) and err.value.param


def test_anthropic_and_responses_tools() -> None:
    schema = {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}
    a = parse_anthropic_tools([{"name": "search", "description": "Search", "input_schema": schema}])
    r = parse_responses_tools([{"type": "function", "name": "search", "parameters": schema}])
    assert a[0].name == r[0].name == "search" and a[0].parameters == r[0].parameters == schema
    with pytest.raises(InvalidRequest, match="input_schema: Field required"):
        parse_anthropic_tools([{"name": "search"}])
    with pytest.raises(InvalidRequest, match="only custom"):
        parse_anthropic_tools([{"type": "web_search_20250305", "name": "web_search"}])
    with pytest.raises(InvalidRequest, match="only 'function' tools"):
        parse_responses_tools([{"type": "web_search_preview"}])


def test_tool_choice_in_every_dialect() -> None:
    tools = parse_tools([WEATHER, ADD])
    named = ToolChoice("function", "add")
    assert parse_tool_choice(None, tools) == AUTO and parse_tool_choice(None, []) == NONE
    assert parse_tool_choice("required", tools) == REQUIRED
    assert parse_tool_choice({"type": "function", "function": {"name": "add"}}, tools) == named
    assert parse_tool_choice({"type": "function", "name": "add"}, tools) == named  # Responses
    assert parse_anthropic_tool_choice({"type": "any"}, tools) == (REQUIRED, True)
    assert parse_anthropic_tool_choice(
        {"type": "tool", "name": "add", "disable_parallel_tool_use": True}, tools
    ) == (named, False)
    assert parse_anthropic_tool_choice({"type": "none"}, tools) == (NONE, True)
    for bad, dialect in [
        ({"type": "function", "function": {"name": "nope"}}, parse_tool_choice),
        ("sometimes", parse_tool_choice),
        ({"type": "tool", "name": "nope"}, parse_anthropic_tool_choice),
        ({"type": "maybe"}, parse_anthropic_tool_choice),
    ]:
        with pytest.raises(InvalidRequest) as err:
            dialect(bad, tools)  # type: ignore[operator]
        assert err.value.param == "tool_choice"
    with pytest.raises(InvalidRequest, match="only allowed when 'tools' are specified"):
        parse_tool_choice("required", [])


# ----- formats -----------------------------------------------------------------------------


def test_formats_detected_from_the_template(smol_template: str) -> None:
    assert detect_tool_format(HERMES) == "hermes"
    assert detect_tool_format(LLAMA3) == "llama3"
    assert detect_tool_format(MISTRAL) == "mistral"
    assert detect_tool_format(QWEN3_CODER) == "generic"  # XML arguments: not parsed here
    assert detect_tool_format(smol_template) == "generic"
    assert detect_tool_format(None) == "generic"
    assert template_takes_tools(HERMES) and template_takes_tools(LLAMA3)
    assert not template_takes_tools(smol_template)


# ----- the streaming parsers -----------------------------------------------------------------


def chunkings(text: str, seed: int = 0) -> list[list[str]]:
    """Whole, one character at a time, fixed sizes 2..9, and random cuts."""
    out = [[text], list(text)]
    out += [[text[i : i + n] for i in range(0, len(text), n)] for n in range(2, 10)]
    rng = random.Random(seed)
    for _ in range(15):
        sizes, i, chunks = [1, 2, 3, 5, 8, 13], 0, []
        while i < len(text):
            n = rng.choice(sizes)
            chunks.append(text[i : i + n])
            i += n
        out.append(chunks)
    return out


def run(
    fmt: str,
    chunks: list[str],
    names: Collection[str] | None = NAMES,
    parallel: bool = True,
) -> list[OutputEvent]:
    parser = tool_call_parser(fmt, names, parallel=parallel)
    events: list[OutputEvent] = []
    for c in chunks:
        events += parser.feed(c)
    return events + parser.finish()


def check_events(events: list[OutputEvent]) -> None:
    """What a streaming client relies on."""
    started: dict[int, ToolCallStart] = {}
    args: dict[int, str] = {}
    ended: set[int] = set()
    for e in events:
        if isinstance(e, ToolCallStart):
            assert e.index == len(started) and CALL_ID.fullmatch(e.id)
            started[e.index] = e
            args[e.index] = ""
        elif isinstance(e, ToolCallDelta):
            assert e.index in started and e.index not in ended and e.arguments
            args[e.index] += e.arguments
        elif isinstance(e, ToolCallEnd):
            assert e.index in started and e.index not in ended
            assert (e.id, e.name) == (started[e.index].id, started[e.index].name)
            assert e.arguments == args[e.index]
            if e.complete:
                assert isinstance(json.loads(e.arguments), dict)
            ended.add(e.index)
        else:
            assert isinstance(e, ContentDelta) and e.text
    assert ended == set(started)


def calls_of(out: ChatOutput) -> list[tuple[str, Any]]:
    return [(c.name, json.loads(c.arguments)) for c in out.tool_calls]


PARSE_CASES: list[tuple[str, str, str, list[tuple[str, Any]]]] = [
    # (format, reply, content, calls)
    (
        "hermes",
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
        '"unit": "celsius"}}\n</tool_call>\n<tool_call>{"name":"add","arguments":{"a":1,"b":2.5e1}}'
        "</tool_call>",
        "Let me check.",
        [("get_weather", {"city": "Paris", "unit": "celsius"}), ("add", {"a": 1, "b": 25.0})],
    ),
    (
        "hermes",
        '<tool_call>{"name": "add", "arguments": {"code": "if (a) { b } \\"}\\" \\u00e9 \\ud83d'
        '\\ude00", "list": [true, false, null, -0.5, {"x": []}]}}</tool_call>',
        "",
        [
            (
                "add",
                {
                    "code": 'if (a) { b } "}" \u00e9 \U0001f600',
                    "list": [True, False, None, -0.5, {"x": []}],
                },
            )
        ],
    ),
    ("hermes", '<tool_call>{"name": "add"}</tool_call>', "", [("add", {})]),
    (
        "hermes",
        '<tool_call>{"name": "add", "arguments": "{\\"a\\": 2}"}</tool_call>',
        "",
        [("add", {"a": 2})],
    ),
    (  # no close tag before the next call, nor at the end
        "hermes",
        '<tool_call>{"name": "add", "arguments": {"a": 1}}\n<tool_call>{"name": "add", '
        '"arguments": {"a": 2}}',
        "",
        [("add", {"a": 1}), ("add", {"a": 2})],
    ),
    (
        "hermes",
        'I would use <tool_call> tags. <tool_call>{"name": "drop_db", "arguments": {}}'
        "</tool_call> Done.",
        'I would use <tool_call> tags. <tool_call>{"name": "drop_db", "arguments": {}}'
        "</tool_call> Done.",
        [],
    ),
    (
        "hermes",
        '<tool_call>{"name": "add", "arguments": {"a": 1,,}}</tool_call> ok',
        '<tool_call>{"name": "add", "arguments": {"a": 1,,}}</tool_call> ok',
        [],
    ),
    ("hermes", "A plain answer with a < and a <tool", "A plain answer with a < and a <tool", []),
    (
        "llama3",
        '{"name": "get_weather", "parameters": {"city": "Rome"}}; {"name": "add", '
        '"parameters": {"a": 3}}',
        "",
        [("get_weather", {"city": "Rome"}), ("add", {"a": 3})],
    ),
    (
        "llama3",
        '<|python_tag|>{"type": "function", "name": "add", "parameters": {"a": 1}}',
        "",
        [("add", {"a": 1})],
    ),
    ("llama3", '{"answer": 42} is JSON, not a call.', '{"answer": 42} is JSON, not a call.', []),
    ("llama3", "Hello {there}", "Hello {there}", []),
    (
        "mistral",
        'Sure [TOOL_CALLS] [{"name": "add", "arguments": {"a": 1}, "id": "abc123def"}, '
        '{"name": "get_weather", "arguments": {"city": "Oslo"}}]',
        "Sure",
        [("add", {"a": 1}), ("get_weather", {"city": "Oslo"})],
    ),
    (
        "mistral",
        '[TOOL_CALLS]add[ARGS]{"a": 1}[TOOL_CALLS]get_weather[CALL_ID]x1Y2z3W4v[ARGS]'
        '{"city": "Rome"}',
        "",
        [("add", {"a": 1}), ("get_weather", {"city": "Rome"})],
    ),
    ("mistral", '[TOOL_CALLS]add{"b": 2}', "", [("add", {"b": 2})]),
    ("mistral", "[TOOL_CALLS] is how I call, see?", "[TOOL_CALLS] is how I call, see?", []),
    (
        "generic",
        '{"tool_calls": [{"name": "add", "arguments": {"a": 1}}, {"name": "get_weather", '
        '"arguments": {"city": "Z\\u00fcrich"}}]}',
        "",
        [("add", {"a": 1}), ("get_weather", {"city": "Z\u00fcrich"})],
    ),
    ("generic", '{"tool_call": {"name": "add", "arguments": {"a": 1}}}', "", [("add", {"a": 1})]),
    (
        "generic",
        '{"response": "Line 1\\nA \\"quote\\", caf\\u00e9 and \\ud83d\\ude00 \\\\ done"}',
        'Line 1\nA "quote", caf\u00e9 and \U0001f600 \\ done',
        [],
    ),
    ("generic", "Not JSON at all.", "Not JSON at all.", []),
    ("generic", '{"answer": 1}', '{"answer": 1}', []),
]


@pytest.mark.parametrize(("fmt", "reply", "content", "calls"), PARSE_CASES)
def test_parsers_whatever_the_chunking(
    fmt: str, reply: str, content: str, calls: list[tuple[str, Any]]
) -> None:
    for chunks in chunkings(reply):
        events = run(fmt, chunks)
        check_events(events)
        out = collect_output(events)
        assert (out.content, calls_of(out)) == (content, calls), chunks


def test_arguments_stream_as_they_are_generated() -> None:
    reply = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
    parser = tool_call_parser("hermes", NAMES)
    events: list[OutputEvent] = []
    starts_at = None
    for i in range(0, len(reply) - 1, 4):  # all but the call object's closing brace
        events += parser.feed(reply[i : min(i + 4, len(reply) - 1)])
        if starts_at is None and any(isinstance(e, ToolCallStart) for e in events):
            starts_at = i
    assert starts_at is not None and starts_at < reply.index("arguments")  # the name first
    fragments = [e for e in events if isinstance(e, ToolCallDelta)]
    assert len(fragments) > 5 and not any(isinstance(e, ToolCallEnd) for e in events)
    start = events[0]
    assert isinstance(start, ToolCallStart)
    args = '{"city": "Paris", "unit": "celsius"}'
    assert parser.feed("}") == [ToolCallEnd(0, start.id, "get_weather", args)]
    assert parser.finish() == []


def test_a_call_cut_off_is_incomplete_and_given_back_as_content() -> None:
    reply = 'Checking. <tool_call>{"name": "get_weather", "arguments": {"city": "Pa'
    for chunks in chunkings(reply):
        events = run("hermes", chunks)
        check_events(events)
        end = [e for e in events if isinstance(e, ToolCallEnd)]
        assert len(end) == 1 and not end[0].complete and end[0].arguments == '{"city": "Pa'
        out = collect_output(events)  # (whitespace before a call is never content)
        assert out.tool_calls == [] and out.content == reply.replace(". <", ".<")


def test_without_parallel_calls_only_the_first_call_counts() -> None:
    reply = (
        '<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>'
        '<tool_call>{"name": "add", "arguments": {"a": 2}}</tool_call>'
    )
    for chunks in chunkings(reply):
        out = collect_output(run("hermes", chunks, parallel=False))
        assert calls_of(out) == [("add", {"a": 1})] and out.content == ""


def test_any_name_is_accepted_when_no_names_are_given() -> None:
    out = collect_output(
        run("hermes", ['<tool_call>{"name": "x", "arguments": {}}</tool_call>'], None)
    )
    assert calls_of(out) == [("x", {})]


def test_json_scanner_reports_value_spans() -> None:
    text = '{"a": [1, {"b": "x\\"y"}], "c": true} tail'
    scanner = JsonScanner()
    events = []
    for i in range(len(text)):
        events += scanner.scan(text[: i + 1])
    assert scanner.done and text[: scanner.end] == text[:-5]
    spans = {e.path: e.pos for e in events if e.kind == "end"}
    assert text[: spans[("a", 1, "b")]].endswith('"x\\"y"')
    for bad in ['{"a" 1}', "[1,]", '{"a": tru}', "[01]", '"\x01"', "{'a': 1}"]:
        s = JsonScanner()
        s.scan(bad)
        assert s.error, bad


# ----- history and prompts ------------------------------------------------------------------

HISTORY: list[dict[str, Any]] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and 1+2?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_abc",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            },
            {
                "id": "call_def",
                "type": "function",
                "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'},
            },
        ],
    },
    {"role": "tool", "tool_call_id": "call_abc", "content": "22C"},
    {"role": "tool", "tool_call_id": "call_def", "content": [{"type": "text", "text": "3"}]},
    {"role": "user", "content": "Thanks."},
]


def test_history_for_a_tool_aware_template() -> None:
    msgs = messages_for_template(HISTORY, native=True)
    call = msgs[2]["tool_calls"][0]
    assert msgs[2]["content"] == "" and call["function"]["arguments"] == {"city": "Paris"}
    assert msgs[3] == {
        "role": "tool",
        "content": "22C",
        "tool_call_id": "call_abc",
        "name": "get_weather",
    }
    assert msgs[4]["content"] == "3" and msgs[4]["name"] == "add"
    prompt = ChatTemplate(HERMES).render(msgs, tools=parse_tools([WEATHER])[0:1] and [WEATHER])
    assert (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
        in prompt
    )
    assert "<tool_response>\n22C\n</tool_response>\n<tool_response>\n3\n</tool_response>" in prompt


def test_history_for_a_template_without_tools(smol_template: str) -> None:
    msgs = messages_for_template(HISTORY, native=False)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert json.loads(msgs[2]["content"]) == {
        "tool_calls": [
            {"name": "get_weather", "arguments": {"city": "Paris"}},
            {"name": "add", "arguments": {"a": 1, "b": 2}},
        ]
    }
    results = msgs[3]["content"].split("\n\n")
    assert json.loads(results[0]) == {"tool_response": {"name": "get_weather", "content": "22C"}}
    assert results[2] == "Thanks."
    prompt = ChatTemplate(smol_template).render(msgs)  # the raw history would not render
    assert '"tool_response"' in prompt
    with pytest.raises(InvalidRequest):
        ChatTemplate(smol_template).render(HISTORY)


def test_ollama_history_and_mistral_ids() -> None:
    ollama = [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "add", "arguments": {"a": 1}}}],
        },
        {"role": "tool", "content": "1", "tool_name": "add"},
    ]
    msgs = messages_for_template(ollama, native=True)
    assert msgs[0]["tool_calls"][0]["function"] == {"name": "add", "arguments": {"a": 1}}
    assert CALL_ID.fullmatch(msgs[0]["tool_calls"][0]["id"]) and msgs[1]["name"] == "add"
    mistral = messages_for_template(HISTORY, native=True, tool_format="mistral")
    ids = [c["id"] for c in mistral[2]["tool_calls"]]
    assert all(len(i) == 9 and i.isalnum() for i in ids) and len(set(ids)) == 2
    assert [mistral[3]["tool_call_id"], mistral[4]["tool_call_id"]] == ids


def test_system_text_goes_where_the_template_reads_it() -> None:
    user = [{"role": "user", "content": "Hi"}]
    assert with_system_text(user, "T") == [{"role": "system", "content": "T"}, *user]
    assert with_system_text(HISTORY[:2], "T")[0] == {"role": "system", "content": "Be brief.\n\nT"}
    merged = with_system_text(HISTORY[:2], "T", system_role=False)
    assert merged == [{"role": "user", "content": "Be brief.\n\nT\n\nWeather in Paris and 1+2?"}]


# ----- plans ---------------------------------------------------------------------------------


def test_plans(smol_template: str) -> None:
    tools = parse_tools([WEATHER, ADD])
    hermes, smol = ChatTemplate(HERMES), ChatTemplate(smol_template)

    auto_native = plan_tool_calls(tools, AUTO, template=hermes)
    assert auto_native.parse_format == "hermes" and auto_native.grammar is None
    assert auto_native.template_tools == [WEATHER, ADD] and auto_native.system_text is None
    assert auto_native.native_history and auto_native.markers == ("<tool_call>", "</tool_call>")

    auto_generic = plan_tool_calls(tools, AUTO, template=smol)
    assert auto_generic.parse_format == "generic" and auto_generic.template_tools is None
    assert auto_generic.grammar and "response" in auto_generic.grammar
    prompt = auto_generic.prepare_messages([{"role": "user", "content": "Hi"}])
    assert (
        '"name":"get_weather"' in prompt[0]["content"]
        and '{"tool_calls": [' in prompt[0]["content"]
    )
    assert plan_tool_calls(tools, AUTO, template=None).parse_format == "generic"

    forced = plan_tool_calls(tools, ToolChoice("function", "add"), parallel=False, template=hermes)
    assert forced.parse_format == "generic" and forced.template_tools == [WEATHER, ADD]
    assert forced.grammar and '\\"add\\"' in forced.grammar and "get_weather" not in forced.grammar
    parser = forced.new_parser()
    assert parser is not None
    out = collect_output(
        parser.feed('{"tool_calls": [{"name": "get_weather", "arguments": {}}]}') + parser.finish()
    )
    assert out.tool_calls == []  # only the named function may be called

    none = plan_tool_calls(tools, NONE, template=hermes)
    assert none.new_parser() is None and none.template_tools is None and none.grammar is None
    assert none.native_history  # earlier calls still render in the template's own way


def test_events_make_an_openai_stream() -> None:
    """How an adapter turns events into OpenAI chunks (checked with the openai types)."""
    from openai.types.chat import ChatCompletionChunk

    plan = plan_tool_calls(parse_tools([WEATHER, ADD]), AUTO, template=ChatTemplate(HERMES))
    parser = ChatOutputParser(tools=plan.new_parser())
    reply = (
        'On it.<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>'
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    )
    chunks: list[ChatCompletionChunk] = []
    saw_call = False

    def chunk(delta: dict[str, Any], finish: str | None = None) -> None:
        chunks.append(
            ChatCompletionChunk.model_validate(
                {
                    "id": "chatcmpl-1",
                    "object": "chat.completion.chunk",
                    "created": 0,
                    "model": "m",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                }
            )
        )

    def emit(events: list[OutputEvent]) -> None:
        nonlocal saw_call
        for e in events:
            if isinstance(e, ContentDelta):
                chunk({"content": e.text})
            elif isinstance(e, ToolCallStart):
                saw_call = True
                chunk(
                    {
                        "tool_calls": [
                            {
                                "index": e.index,
                                "id": e.id,
                                "type": "function",
                                "function": {"name": e.name, "arguments": ""},
                            }
                        ]
                    }
                )
            elif isinstance(e, ToolCallDelta):
                chunk({"tool_calls": [{"index": e.index, "function": {"arguments": e.arguments}}]})

    for i in range(0, len(reply), 7):
        emit(parser.feed(reply[i : i + 7]))
    emit(parser.finish())
    chunk({}, "tool_calls" if saw_call else "stop")

    # What a client does with the stream:
    content, calls = "", {}
    for c in chunks:
        d = c.choices[0].delta
        content += d.content or ""
        for tc in d.tool_calls or []:
            entry = calls.setdefault(tc.index, {"id": tc.id, "name": "", "arguments": ""})
            entry["name"] += (tc.function.name or "") if tc.function else ""
            entry["arguments"] += (tc.function.arguments or "") if tc.function else ""
    assert content == "On it." and chunks[-1].choices[0].finish_reason == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        ("add", {"a": 1}),
        ("get_weather", {"city": "Oslo"}),
    ]


def test_hermes_round_trip_through_the_template() -> None:
    """`auto` with a tool-aware template: tools rendered, a `<tool_call>` reply parsed in any
    chunking, and the call and its result rendered back as history."""
    tools = parse_tools([WEATHER, ADD])
    template = ChatTemplate(HERMES)
    plan = plan_tool_calls(tools, AUTO, template=template)
    question = [{"role": "user", "content": "Weather in Paris?"}]
    prompt = template.render(plan.prepare_messages(question), tools=plan.template_tools)
    assert json.dumps(WEATHER) in prompt and prompt.endswith("<|im_start|>assistant\n")

    reply = (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
        "\n</tool_call>"
    )
    for chunks in chunkings(reply, seed=3):
        parser = plan.new_parser()
        assert parser is not None
        events = [e for c in chunks for e in parser.feed(c)] + parser.finish()
        out = collect_output(events)
        assert out.content == "" and calls_of(out) == [
            ("get_weather", {"city": "Paris", "unit": "celsius"})
        ]

    call = out.tool_calls[0]
    history = [
        *question,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": "22C and sunny"},
    ]
    again = template.render(plan.prepare_messages(history), tools=plan.template_tools)
    assert reply in again and "<tool_response>\n22C and sunny\n</tool_response>" in again


@pytest.mark.parametrize("fmt", ["hermes", "llama3", "mistral", "generic"])
def test_garbage_never_raises_and_never_loses_text(fmt: str) -> None:
    """Replies cut and spliced from valid ones, fed in random chunks: the parsers never raise,
    keep their event invariants, and every non-space character comes back out somewhere."""
    pieces = [reply for f, reply, _, _ in PARSE_CASES] + [
        "<tool_call>",
        "</tool_call>",
        "[TOOL_CALLS]",
        "<|python_tag|>",
        '{"name": "add", "arguments": ',
        '"\\u12',
        "}}]",
        ";",
        " text ",
    ]
    rng = random.Random(fmt)
    for _ in range(300):
        reply = "".join(
            p[rng.randrange(len(p) + 1) :][: rng.randrange(1, 60)]
            for p in rng.sample(pieces, rng.randint(1, 4))
        )
        cuts = sorted(rng.sample(range(1, len(reply)), min(len(reply) - 1, 8))) if reply else []
        chunks = [reply[a:b] for a, b in zip([0, *cuts], [*cuts, len(reply)], strict=True)]
        events = run(fmt, chunks)
        check_events(events)
        out = collect_output(events)
        if not out.tool_calls and fmt != "generic":  # (generic decodes its JSON response)
            assert re.sub(r"\s", "", out.content) == re.sub(r"\s", "", reply), chunks


def test_schemas_without_constraints_accept_any_value() -> None:
    """`{}` or a description alone means any JSON value (as in llama.cpp's C++ converter);
    llama-cpp-python's converter rejected the second. A root without constraints is still an
    object: a tool's arguments, or a response_format."""
    from llama_cpp.llama_grammar import LlamaGrammar

    from server.grammar import json_grammar, tool_call_grammar

    loose = {
        "type": "object",
        "properties": {"args": {"description": "any JSON value"}, "extra": {}},
        "required": ["args"],
    }
    tools = parse_tools(
        [
            {"type": "function", "function": {"name": "loose", "parameters": loose}},
            {"type": "function", "function": {"name": "bare", "parameters": {"title": "No args"}}},
        ]
    )
    grammars = [tool_call_grammar(tools, REQUIRED, True), json_grammar(loose), json_grammar({})]
    for g in grammars:
        LlamaGrammar.from_string(g, verbose=False)  # llama.cpp parses it
    rules = dict(line.split(" ::= ", 1) for g in grammars for line in g.splitlines())
    assert rules["tool0-arguments-args"] == rules["tool0-arguments-extra"] == "value"
    assert rules["tool1-arguments"] == "object"
    assert rules["args"] == "value" and "root ::= object" in grammars[2]


def test_the_tool_listing_for_a_template_without_tools_is_compact() -> None:
    # Claude Code's tools as indented JSON doubled its prompt on such a model: one line of
    # compact JSON per tool, without the schema noise the grammar makes needless.
    from pathlib import Path

    from server.toolcalls import generic_tool_prompt, parse_anthropic_tools

    raw = json.loads((Path(__file__).parent / "claude_code_tools.json").read_text())
    tools = parse_anthropic_tools(raw)
    text = generic_tool_prompt(tools, AUTO, True)
    indented = json.dumps([t.brief() for t in tools], ensure_ascii=False, indent=2)
    assert len(text) < 0.75 * len(indented)
    lines = [ln for ln in text.splitlines() if ln.startswith('{"name":')]
    assert len(lines) == len(tools)
    assert all(json.loads(ln)["name"] == t.name for ln, t in zip(lines, tools, strict=True))
    assert "$schema" not in text and '"additionalProperties":false' not in text
