"""The one request path, seen from its clients: SSE framing, usage and metrics over every prompt,
stop strings at end of text, and each router's error dialect."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse
from prometheus_client.parser import text_string_to_metric_families

from server.engines.base import GenerationRequest, SamplingParams, collect
from server.runner import ServerThread
from server.runtime import Runtime

MODEL = "smollm2-135m-instruct.q4_1"
HI = [{"role": "user", "content": "Say hello."}]


def _sse_events(url: str, method: str, body: dict[str, Any] | None = None) -> list[Any]:
    """Read an event stream with httpx-sse, which refuses anything but text/event-stream."""
    with (
        httpx.Client(timeout=120) as c,
        connect_sse(c, method, url, json=body) as source,
    ):
        assert source.response.headers["content-type"].startswith("text/event-stream")
        return list(source.iter_sse())


def test_openai_streams_are_server_sent_events(server: ServerThread) -> None:
    chat = _sse_events(
        server.url + "/v1/chat/completions",
        "POST",
        {"model": MODEL, "messages": HI, "max_tokens": 5, "stream": True},
    )
    assert chat[-1].data == "[DONE]" and chat[0].json()["object"] == "chat.completion.chunk"
    text = _sse_events(
        server.url + "/v1/completions",
        "POST",
        {"model": MODEL, "prompt": "Once", "max_tokens": 5, "stream": True},
    )
    assert text[-1].data == "[DONE]" and text[0].json()["object"] == "text_completion"


def test_admin_streams_are_server_sent_events(server: ServerThread) -> None:
    events = _sse_events(server.url + f"/admin/models/{MODEL}/load", "POST")
    assert [e.event for e in events] == ["loading", "loaded"]
    with (
        httpx.Client(timeout=30) as c,
        connect_sse(c, "GET", server.url + "/admin/events") as source,
    ):
        assert source.response.headers["content-type"].startswith("text/event-stream")


def _prompt_tokens_total(url: str) -> float:
    fams = {f.name: f for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)}
    return sum(
        s.value
        for s in fams["lmx_prompt_tokens"].samples
        if s.name == "lmx_prompt_tokens_total" and s.labels["model"] == MODEL
    )


def test_metrics_count_every_prompt_of_a_list(server: ServerThread) -> None:
    before = _prompt_tokens_total(server.url)
    r = httpx.post(
        server.url + "/v1/completions",
        timeout=120,
        json={
            "model": MODEL,
            "prompt": ["One two three", "A much longer second prompt than the first"],
            "max_tokens": 2,
            "n": 2,
        },
    ).json()
    assert len(r["choices"]) == 4
    counted = _prompt_tokens_total(server.url) - before
    assert counted == r["usage"]["prompt_tokens"] > 8  # both prompts, each once


def test_text_held_for_a_stop_string_is_kept_when_the_model_ends(rt: Runtime) -> None:
    with rt.scheduler.lease(rt.catalog.resolve(MODEL)) as lease:
        _held_text_is_kept(lease.engine)


def _held_text_is_kept(engine: Any) -> None:
    prompt = engine.format_chat([{"role": "user", "content": "Say hello."}])
    plain, fin = collect(engine, GenerationRequest(prompt, 200, SamplingParams(temperature=0)))
    assert fin.reason == "stop" and plain  # the model ends on its own (end of text)
    # A stop string that starts with the reply's last characters but never completes: those
    # characters are held back as a possible match, and must come out when the model stops.
    stop = plain[-2:] + "\u2603never"
    held, fin2 = collect(
        engine, GenerationRequest(prompt, 200, SamplingParams(temperature=0), stop=[stop])
    )
    assert fin2.reason == "stop" and held == plain


@pytest.mark.parametrize(
    ("path", "body", "shape"),
    [
        ("/v1/chat/completions", b"{nope", "openai"),
        ("/v1/chat/completions", b'{"model": "x"}', "openai"),
        ("/api/chat", b"{nope", "ollama"),
        ("/api/generate", b'{"prompt": 3}', "ollama"),
        ("/admin/downloads", b'{"quant": 1}', "openai"),
    ],
)
def test_each_router_answers_errors_in_its_dialect(
    server: ServerThread, path: str, body: bytes, shape: str
) -> None:
    r = httpx.post(server.url + path, content=body, timeout=30)
    assert r.status_code == 400
    err = r.json()["error"]
    if shape == "ollama":
        assert isinstance(err, str) and err
    else:
        assert set(err) == {"message", "type", "param", "code"}


def test_calls_an_engine_parsed_itself_become_the_parsers_events() -> None:
    """An upstream's `tool_calls` deltas: a call starts once its name is known (arguments that
    came first are not lost) and ends when the next one starts; servers' own indexes are
    renumbered from 0; a call whose arguments are not a JSON object is given back as text,
    as a broken parsed call is."""
    from server.chat_output import ContentDelta, ToolCallDelta, ToolCallEnd, ToolCallStart
    from server.engines.base import CallPiece
    from server.pipeline import EngineCalls

    calls = EngineCalls()
    out = calls.feed(CallPiece(3, id="call_a"))  # no name yet: nothing to start
    out += calls.feed(CallPiece(3, arguments='{"city": '))
    out += calls.feed(CallPiece(3, name="get_weather", arguments='"Paris"}'))
    assert out == [
        ToolCallStart(0, "call_a", "get_weather"),
        ToolCallDelta(0, '{"city": "Paris"}'),
    ]
    out = calls.feed(CallPiece(7, name="get_time", arguments='{"city": "Ro'))
    assert out[0] == ToolCallEnd(0, "call_a", "get_weather", '{"city": "Paris"}')
    start = out[1]
    assert isinstance(start, ToolCallStart) and start.id.startswith("call_") and start.index == 1
    assert out[2:] == [ToolCallDelta(1, '{"city": "Ro')]
    assert calls.feed(CallPiece(3, arguments="late")) == []  # call 0 has ended
    out = calls.feed(CallPiece(9, arguments="stray"))  # never named
    assert out == [ToolCallEnd(1, start.id, "get_time", '{"city": "Ro', False, '{"city": "Ro')]
    assert calls.finish("length") == [ContentDelta("stray")]

    # Servers that leave out `index` send each call whole: a new id is a new call.
    calls = EngineCalls()
    out = calls.feed(CallPiece(0, "id1", "f", '{"a": 1}'))
    out += calls.feed(CallPiece(0, "id2", "g", '{"b": 2}'))
    out += calls.finish("stop")
    ends = [e for e in out if isinstance(e, ToolCallEnd)]
    assert [(e.id, e.name, e.arguments, e.complete) for e in ends] == [
        ("id1", "f", '{"a": 1}', True),
        ("id2", "g", '{"b": 2}', True),
    ]

    # No arguments: a function that takes none, unless the limit cut the reply first.
    for reason, complete in (("stop", True), ("length", False)):
        calls.feed(CallPiece(0, id="call_b", name="now"))
        [end] = calls.finish(reason)
        assert isinstance(end, ToolCallEnd) and end.complete is complete


def test_tools_go_to_an_upstream_in_the_form_every_server_reads() -> None:
    """llama-server reads tool_choice only as a string (an object becomes `auto`) and defaults
    parallel_tool_calls to false: a named choice goes as that one tool with `required`, and the
    parallel flag always goes."""
    from server.pipeline import GenerateRequest, upstream_tools
    from server.toolcalls import ToolChoice, ToolSpec

    tools = [ToolSpec("a", "", {"type": "object"}), ToolSpec("b", "", {"type": "object"})]
    req = GenerateRequest("m", messages=HI, tools=tools)
    sent, choice, parallel = upstream_tools(req)
    assert [t["function"]["name"] for t in sent or []] == ["a", "b"]
    assert (choice, parallel) == ("auto", True)
    named = GenerateRequest("m", messages=HI, tools=tools, tool_choice=ToolChoice("function", "b"))
    sent, choice, parallel = upstream_tools(named)
    assert [t["function"]["name"] for t in sent or []] == ["b"]
    assert (choice, parallel) == ("required", False)
    assert upstream_tools(GenerateRequest("m", messages=HI)) == (None, None, None)
