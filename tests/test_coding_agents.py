"""What coding agents (Claude Code, Codex CLI, OpenCode, aider) send, understood: their wire
shapes against a real server and model. The real CLIs run in tests/test_agent_clis.py."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from server.runner import ServerThread

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
