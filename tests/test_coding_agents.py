"""What coding agents (Claude Code, Codex CLI, OpenCode, aider) send, understood: their wire
shapes against a real server and model. The real CLIs run in tests/test_agent_clis.py."""

from __future__ import annotations

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
