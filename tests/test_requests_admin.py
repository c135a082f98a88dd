"""Requests in flight: live counters from the engine, GET /admin/requests, cancel, details."""

from __future__ import annotations

import json
from typing import Any

import httpx

from server.runner import ServerThread
from server.runtime import Runtime
from tests.conftest import BackgroundStream, wait_for

MODEL = "smollm2-135m-instruct.q4_1"


def in_flight(server: ServerThread) -> list[dict[str, Any]]:
    r = httpx.get(server.url + "/admin/requests", timeout=30)
    assert r.status_code == 200
    return r.json()["in_flight"]  # type: ignore[no-any-return]


def test_a_request_in_flight_is_listed_with_live_counters_and_can_be_cancelled(
    server: ServerThread, rt: Runtime
) -> None:
    stream = BackgroundStream(server.url, MODEL, max_tokens=4000)
    wait_for(lambda: any(r["generated"] >= 5 for r in in_flight(server)), 60)
    [live] = [r for r in in_flight(server) if r["generated"] >= 5]
    assert live["model"] == MODEL and live["source"] == "openai"
    assert live["phase"] == "decode" and len(live["slots"]) == 1
    assert live["prompt_tokens"] > 0 and live["prompt_done"] == live["prompt_tokens"]
    assert live["path"] == "/v1/chat/completions" and live["age_s"] > 0
    # the same object the app's key uses
    assert [s.id for s in rt.service.in_flight()] == [live["id"]]
    r = httpx.post(f"{server.url}/admin/requests/{live['id']}/cancel", timeout=30)
    assert r.status_code == 200 and r.json() == {"id": live["id"], "cancelled": True}
    lines = stream.finish()  # the client's stream ends, with the reason
    assert lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2].removeprefix("data: "))
    assert last["choices"][0]["finish_reason"] == "cancelled"
    wait_for(lambda: not in_flight(server))
    got = httpx.get(server.url + "/admin/requests", params={"limit": 5}, timeout=30).json()
    rec = next(x for x in got["recent"] if x["id"] == live["id"])
    assert rec["finish_reason"] == "cancelled" and rec["completion_tokens"] >= 5
    detail = httpx.get(f"{server.url}/admin/requests/{live['id']}", timeout=30).json()
    assert detail["messages"] == [{"role": "user", "content": "Write a long story."}]
    assert detail["replies"][0] and detail["finish_reasons"] == ["cancelled"]
    assert detail["timings"][0]["prompt_tokens"] == live["prompt_tokens"]


def test_unknown_requests_are_404_in_openai_shape(server: ServerThread) -> None:
    r = httpx.post(server.url + "/admin/requests/req-nope/cancel", timeout=30)
    assert r.status_code == 404 and "req-nope" in r.json()["error"]["message"]
    r = httpx.get(server.url + "/admin/requests/req-nope", timeout=30)
    assert r.status_code == 404


def test_estimate_says_why_a_model_does_not_fit_and_what_would(
    server: ServerThread, rt: Runtime
) -> None:
    info = rt.catalog.resolve(MODEL)
    est = rt.scheduler.estimate_for(info)
    old = rt.settings.max_memory
    rt.config.update(max_memory=est.weights + est.compute + est.kv_cache // 2)
    try:
        r = httpx.get(server.url + "/admin/estimate", params={"model": MODEL}, timeout=30)
        body = r.json()
        assert r.status_code == 200 and body["fits_alone"] is False
        assert MODEL in body["reason"] and "budget" in body["reason"]
        kinds = {o["kind"] for o in body["options"]}
        assert kinds & {"ctx", "parallel"} and all(o["text"] for o in body["options"])
    finally:
        rt.config.update(max_memory=old)
