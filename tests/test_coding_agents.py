"""What coding agents (Claude Code, Codex CLI, OpenCode, aider) send, understood: their wire
shapes against a real server and model. The real CLIs run in tests/test_agent_clis.py."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest

from server.runner import ServerThread
from server.runtime import Runtime
from tests.conftest import make_config

SMOL = "smollm2-135m-instruct.q4_1"


def _raw_stream(url: str, path: str, body: dict[str, Any], **headers: str) -> bytes:
    with httpx.stream("POST", url + path, json=body, headers=headers, timeout=300) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return r.read()


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
        ("/v1/completions", {"prompt": "Hi"}),
        ("/v1/responses", {"input": "Hi"}),
        ("/v1/messages", {"messages": [{"role": "user", "content": "Hi"}]}),
    ],
)
def test_sse_is_framed_with_lf_as_openai_and_anthropic_frame_it(
    server: ServerThread, path: str, body: dict[str, Any]
) -> None:
    body = {"model": SMOL, "stream": True, "max_tokens": 4, **body}
    if path == "/v1/responses":
        body["max_output_tokens"] = body.pop("max_tokens")
    raw = _raw_stream(server.url, path, body)
    assert b"\r" not in raw
    frames = [f for f in raw.split(b"\n\n") if f]
    assert len(frames) >= 3  # a strict LF parser sees every event
    assert all(
        line.startswith((b"data: ", b"event: ", b": ")) for f in frames for line in f.split(b"\n")
    )


def test_claude_code_probe_head_root_answers_without_a_key() -> None:
    # Claude Code probes `HEAD /` before its first request; Ollama's root says it runs.
    rt = Runtime(make_config(api_key="sekrit"))
    try:
        with ServerThread(rt) as srv:
            assert httpx.head(srv.url + "/").status_code == 200
            r = httpx.get(srv.url + "/")
            assert r.status_code == 200 and "lmx is running" in r.text
            assert httpx.get(srv.url + "/v1/models").status_code == 401  # the rest still guarded
    finally:
        rt.close()


def test_ollama_version_is_one_codex_oss_accepts(server: ServerThread) -> None:
    # Codex's --oss mode refuses an Ollama older than 0.13.4.
    body = httpx.get(server.url + "/api/version").json()
    major, minor, patch = (int(p) for p in body["version"].split(".")[:3])
    assert (major, minor, patch) >= (0, 13, 4)
    assert body["lmx"]  # lmx's own version stays readable


def test_models_in_anthropics_list_shape_for_the_anthropic_client(server: ServerThread) -> None:
    import anthropic

    client = anthropic.Anthropic(base_url=server.url, api_key="unused")
    page = client.models.list(limit=1000)
    ids = [m.id for m in page.data]
    assert SMOL in ids
    first = page.data[0]
    assert first.type == "model" and first.display_name and first.created_at.year >= 1970
    raw = httpx.get(
        server.url + "/v1/models", params={"limit": 1}, headers={"anthropic-version": "2023-06-01"}
    ).json()
    assert set(raw) == {"data", "has_more", "first_id", "last_id"}
    assert len(raw["data"]) == 1 and raw["first_id"] == raw["last_id"] == raw["data"][0]["id"]
    assert raw["has_more"] is (len(ids) > 1)
    after = httpx.get(
        server.url + "/v1/models",
        params={"after_id": raw["last_id"], "limit": 1000},
        headers={"anthropic-version": "2023-06-01"},
    ).json()
    assert [m["id"] for m in after["data"]] == ids[1:]
    one = client.models.retrieve(SMOL)
    assert one.id == SMOL and one.type == "model"
    # Without the header, the OpenAI shape as before.
    assert httpx.get(server.url + "/v1/models").json()["object"] == "list"
    # A bad page or an unknown model is an error in the dialect the client speaks.
    with pytest.raises(anthropic.BadRequestError) as bad:
        client.models.list(limit=5000)
    assert bad.value.body["type"] == "error" and "limit" in bad.value.body["error"]["message"]
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.models.retrieve("no-such-model")
    assert missing.value.body["type"] == "error"
    r = httpx.get(
        server.url + "/v1/models",
        params={"after_id": "nope"},
        headers={"anthropic-version": "2023-06-01"},
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert "object" not in r.json()["error"] and r.json()["type"] == "error"


def test_unknown_anthropic_beta_values_are_accepted(server: ServerThread) -> None:
    r = httpx.post(
        server.url + "/v1/messages?beta=true",
        json={"model": SMOL, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]},
        headers={
            "anthropic-version": "2023-06-01",
            "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,made-up-2099",
        },
        timeout=120,
    )
    assert r.status_code == 200, r.text
    assert r.json()["type"] == "message"


def _claude_code_turn(url: str, cch: str) -> dict[str, Any]:
    system = [
        {
            "type": "text",
            "text": f"x-anthropic-billing-header: cc_version=2.1.332.a1b; cc_entrypoint=cli; "
            f"cch={cch};",
        },
        {"type": "text", "text": "You are a careful coding agent. " * 40},
    ]
    r = httpx.post(
        url + "/v1/messages?beta=true",
        json={
            "model": SMOL,
            "max_tokens": 2,
            "system": system,
            "messages": [{"role": "user", "content": "List the files."}],
        },
        headers={"anthropic-version": "2023-06-01"},
        timeout=300,
    )
    assert r.status_code == 200, r.text
    usage: dict[str, Any] = r.json()["usage"]
    return usage


def test_claude_codes_changing_billing_stamp_does_not_break_the_prefix_cache(
    server: ServerThread,
) -> None:
    # Claude Code stamps its first system block with a `cch` that changes on every request:
    # normalised (as llama.cpp does), the second turn reuses the whole system prompt.
    first = _claude_code_turn(server.url, "a5145")
    second = _claude_code_turn(server.url, "9e01c")
    total = second["input_tokens"] + second["cache_read_input_tokens"]
    assert total == first["input_tokens"] + first["cache_read_input_tokens"]
    assert second["cache_read_input_tokens"] >= total - 16, second


# The top-level fields of the Open Responses spec's ResponseResource, and their types.
_INT, _NUM, _STR, _BOOL = (int,), (int, float), (str,), (bool,)
RESPONSE_FIELDS: dict[str, tuple[type, ...]] = {
    "id": _STR,
    "object": _STR,
    "created_at": _INT,
    "completed_at": (*_INT, type(None)),
    "status": _STR,
    "incomplete_details": (dict, type(None)),
    "model": _STR,
    "previous_response_id": (str, type(None)),
    "instructions": (str, type(None)),
    "output": (list,),
    "error": (dict, type(None)),
    "tools": (list,),
    "tool_choice": (str, dict),
    "truncation": _STR,
    "parallel_tool_calls": _BOOL,
    "text": (dict,),
    "top_p": _NUM,
    "presence_penalty": _NUM,
    "frequency_penalty": _NUM,
    "top_logprobs": _INT,
    "temperature": _NUM,
    "reasoning": (dict, type(None)),
    "usage": (dict, type(None)),
    "max_output_tokens": (int, type(None)),
    "max_tool_calls": (int, type(None)),
    "store": _BOOL,
    "background": _BOOL,
    "service_tier": _STR,
    "safety_identifier": (str, type(None)),
    "prompt_cache_key": (str, type(None)),
}


def _check_resource(resp: dict[str, Any]) -> None:
    for name, kinds in RESPONSE_FIELDS.items():
        assert name in resp, name
        assert isinstance(resp[name], kinds) and not (
            isinstance(resp[name], bool) and bool not in kinds
        ), (name, resp[name])
    for t in resp["tools"]:
        if t["type"] == "function":
            assert isinstance(t["strict"], bool)


def _stream_events(url: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    raw = _raw_stream(url, "/v1/responses", {**body, "stream": True})
    out = []
    for frame in raw.decode().split("\n\n"):
        data = [line[6:] for line in frame.split("\n") if line.startswith("data: ")]
        if data:
            out.append(json.loads("\n".join(data)))
    return out


WEATHER_FN = {
    "type": "function",
    "name": "get_weather",
    "description": "Get the current weather for a location",
    "parameters": {
        "type": "object",
        "properties": {"location": {"type": "string", "maxLength": 30}},
        "required": ["location"],
    },
}


@pytest.mark.parametrize("stream", [False, True])
def test_responses_objects_carry_every_field_the_open_responses_spec_requires(
    server: ServerThread, stream: bool
) -> None:
    body = {
        "model": SMOL,
        "input": [{"type": "message", "role": "user", "content": "Say hello."}],
        "max_output_tokens": 4,
        "tools": [WEATHER_FN],
        "tool_choice": "none",
    }
    if stream:
        events = _stream_events(server.url, body)
        resp = events[-1]["response"]
        _check_resource(events[0]["response"])
    else:
        r = httpx.post(server.url + "/v1/responses", json=body, timeout=300)
        assert r.status_code == 200, r.text
        resp = r.json()
    _check_resource(resp)
    assert resp["temperature"] == 0.8 and resp["top_p"] == 0.95  # the defaults lmx applied
    assert resp["tools"][0]["strict"] is True
    assert resp["completed_at"] is None or resp["completed_at"] >= resp["created_at"]
    given = httpx.post(
        server.url + "/v1/responses",
        json={**body, "temperature": 0, "top_p": 0.5, "prompt_cache_key": "k1"},
        timeout=300,
    ).json()
    assert (given["temperature"], given["top_p"], given["prompt_cache_key"]) == (0, 0.5, "k1")


# Codex CLI's tools: functions, a namespace of functions, a freeform tool with a grammar, and
# two tools a hosted server runs.
APPLY_PATCH = {
    "type": "custom",
    "name": "apply_patch",
    "description": "Use the `apply_patch` tool to edit files.",
    "format": {
        "type": "grammar",
        "syntax": "lark",
        "definition": 'start: begin_patch hunk+ end_patch\nbegin_patch: "*** Begin Patch" LF\n',
    },
}
CODEX_TOOLS = [
    {
        "type": "function",
        "name": "shell",
        "description": "Runs a shell command and returns its output.",
        "strict": False,
        "parameters": {
            "type": "object",
            "properties": {"command": {"type": "array", "items": {"type": "string"}}},
            "required": ["command"],
        },
    },
    {
        "type": "namespace",
        "name": "multi_agent",
        "description": "Tools in the multi_agent namespace.",
        "tools": [
            {
                "type": "function",
                "name": "spawn_agent",
                "description": "Start a sub-agent.",
                "strict": False,
                "parameters": {
                    "type": "object",
                    "properties": {"task": {"type": "string", "maxLength": 20}},
                    "required": ["task"],
                },
            }
        ],
    },
    APPLY_PATCH,
    {"type": "web_search", "external_web_access": False},
    {"type": "image_generation", "output_format": "png"},
]


def test_codex_tools_are_understood_and_the_hosted_ones_left_out(
    server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    body = {
        "model": SMOL,
        "instructions": "You are Codex.",
        "input": [{"type": "message", "role": "user", "content": "Start an agent."}],
        "tools": CODEX_TOOLS,
        "store": False,
        "max_output_tokens": 40,
    }
    headers = {"user-agent": "codex_cli_rs/0.171.0"}
    with caplog.at_level("INFO", logger="server.api.responses_tools"):
        for _ in range(2):
            r = httpx.post(
                server.url + "/v1/responses",
                json={**body, "tool_choice": {"type": "function", "name": "spawn_agent"}},
                headers=headers,
                timeout=300,
            )
            assert r.status_code == 200, r.text
    said = [m for m in caplog.messages if "left out of the prompt" in m]
    assert len(said) == 2 and any("'web_search'" in m for m in said), said  # once per kind
    call = next(i for i in r.json()["output"] if i["type"] == "function_call")
    assert call["name"] == "spawn_agent" and call["namespace"] == "multi_agent"
    assert set(json.loads(call["arguments"])) == {"task"}
    # The freeform tool: its call is a custom_tool_call with a string input, streamed too.
    events = _stream_events(
        server.url, {**body, "tool_choice": {"type": "custom", "name": "apply_patch"}}
    )
    kinds = [e["type"] for e in events]
    assert "response.custom_tool_call_input.done" in kinds
    assert "response.function_call_arguments.delta" not in kinds
    done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    custom = next(i for i in done if i["type"] == "custom_tool_call")
    assert custom["name"] == "apply_patch" and isinstance(custom["input"], str)
    assert events[-1]["response"]["output"][-1] == custom
    # The next turn sends the call and its output back, as Codex does.
    follow = {
        **body,
        "tool_choice": "none",
        "max_output_tokens": 4,
        "input": [
            *body["input"],
            {
                "type": "custom_tool_call",
                "call_id": custom["call_id"],
                "name": "apply_patch",
                "input": custom["input"],
            },
            {"type": "custom_tool_call_output", "call_id": custom["call_id"], "output": "Done!"},
            {
                "type": "web_search_call",
                "id": "ws_1",
                "status": "completed",
                "action": {"type": "search", "query": "x"},
            },
        ],
    }
    r = httpx.post(server.url + "/v1/responses", json=follow, headers=headers, timeout=300)
    assert r.status_code == 200, r.text


CHAT_WEATHER = {
    "type": "function",
    "function": {"name": WEATHER_FN["name"], "parameters": WEATHER_FN["parameters"]},
}


@pytest.mark.parametrize("choice", ["none", "required"])
def test_an_empty_tool_calls_list_is_never_sent(server: ServerThread, choice: str) -> None:
    # OpenCode stalls on `tool_calls: []` with finish_reason "tool_calls".
    body = {
        "model": SMOL,
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": [CHAT_WEATHER],
        "tool_choice": choice,
        "max_tokens": 40,
    }
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=300).json()
    msg, reason = r["choices"][0]["message"], r["choices"][0]["finish_reason"]
    assert msg.get("tool_calls", None) != []
    assert reason != "tool_calls" or msg["tool_calls"]
    raw = _raw_stream(server.url, "/v1/chat/completions", {**body, "stream": True})
    calls = 0
    for frame in raw.decode().split("\n\n"):
        if not frame.startswith("data: {"):
            continue
        for c in json.loads(frame[6:])["choices"]:
            if "tool_calls" in c["delta"]:
                assert c["delta"]["tool_calls"], frame
                calls += 1
            if c.get("finish_reason") == "tool_calls":
                assert calls > 0


LONG_TEXT = {
    "type": "object",
    "properties": {"text": {"type": "string", "maxLength": 2000}},
    "required": ["text"],
}


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": "Write."}],
                "tools": [{"type": "function", "function": {"name": "w", "parameters": LONG_TEXT}}],
                "tool_choice": "required",
                "max_tokens": 8,
            },
        ),
        (
            "/v1/messages",
            {
                "messages": [{"role": "user", "content": "Write."}],
                "tools": [{"name": "w", "input_schema": LONG_TEXT}],
                "tool_choice": {"type": "any"},
                "max_tokens": 8,
            },
        ),
        (
            "/v1/responses",
            {
                "input": "Write.",
                "tools": [{"type": "function", "name": "w", "parameters": LONG_TEXT}],
                "tool_choice": "required",
                "max_output_tokens": 8,
            },
        ),
    ],
)
def test_a_tool_with_a_2000_character_string_is_served(
    server: ServerThread, path: str, body: dict[str, Any]
) -> None:
    # It used to be refused as "The grammar for this response_format is invalid" though the
    # request had no response_format.
    r = httpx.post(server.url + path, json={"model": SMOL, **body}, timeout=300)
    assert r.status_code == 200, r.text


def test_a_prompt_over_the_context_gets_each_dialects_error_with_both_numbers(
    server: ServerThread,
) -> None:
    long = "word " * 5000
    user = [{"role": "user", "content": long}]
    # Claude Code compacts its conversation when the error says "prompt is too long".
    r = httpx.post(
        server.url + "/v1/messages",
        json={"model": SMOL, "max_tokens": 4, "messages": user},
        headers={"anthropic-version": "2023-06-01"},
        timeout=120,
    )
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert re.fullmatch(r"prompt is too long: \d{4,} tokens > 2048 maximum\..*", err["message"])
    r = httpx.post(server.url + "/v1/responses", json={"model": SMOL, "input": long}, timeout=120)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "2048" in r.json()["error"]["message"]
    r = httpx.post(
        server.url + "/api/chat",
        json={"model": SMOL, "messages": user, "stream": False},
        timeout=120,
    )
    assert r.status_code == 400 and "2048" in r.json()["error"], r.text
    assert re.search(r"\b\d{4,} tokens", r.json()["error"])


def test_a_fan_out_of_subagents_does_not_cost_the_parent_its_prefix() -> None:
    # Claude Code's Task tool starts subagents (their own x-claude-code-agent-id and system
    # prompt) while the parent waits: three of them on two slots take the parent's slot too.
    # Its prefix is kept aside and comes back: the parent's next turn computes only what is new.
    from concurrent.futures import ThreadPoolExecutor

    def turn(url: str, system: str, messages: list[dict[str, Any]], agent: str) -> dict[str, Any]:
        r = httpx.post(
            url + "/v1/messages?beta=true",
            json={"model": SMOL, "max_tokens": 2, "system": system, "messages": messages},
            headers={"anthropic-version": "2023-06-01", "x-claude-code-agent-id": agent},
            timeout=300,
        )
        assert r.status_code == 200, r.text
        usage: dict[str, Any] = r.json()["usage"]
        return usage

    rt = Runtime(make_config(parallel=2))
    try:
        with ServerThread(rt) as srv:
            parent = "You are the lead agent. Plan the work, then delegate it. " * 30
            first = [{"role": "user", "content": "Fix the failing tests."}]
            before = turn(srv.url, parent, first, "lead")
            with ThreadPoolExecutor(3) as pool:
                subs = [
                    pool.submit(
                        turn,
                        srv.url,
                        f"You are subagent {k}. Search the code for test {k}. " * 30,
                        [{"role": "user", "content": f"Find test {k}."}],
                        f"sub-{k}",
                    )
                    for k in range(3)
                ]
                assert all(f.result()["output_tokens"] >= 0 for f in subs)
            again = [
                *first,
                {"role": "assistant", "content": "I asked three subagents."},
                {"role": "user", "content": "They found it."},
            ]
            after = turn(srv.url, parent, again, "lead")
            prompt = before["input_tokens"] + before["cache_read_input_tokens"]
            assert after["cache_read_input_tokens"] >= prompt - 8, (before, after)
    finally:
        rt.close()
