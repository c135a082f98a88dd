"""Many models, one budget: estimates, eviction, keep_alive, admin API and /metrics."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.errors import ModelTooLarge
from server.events import LmxEvent
from server.runner import ServerThread
from server.runtime import Runtime
from tests.conftest import BackgroundStream, load, make_config, wait_for

SMOL = "smollm2-135m-instruct.q4_1"


@pytest.fixture(scope="module")
def models_dir(
    tmp_path_factory: pytest.TempPathFactory, gemma_path: Path, smollm2_path: Path
) -> Path:
    d = tmp_path_factory.mktemp("models")
    (d / "gemma.gguf").symlink_to(gemma_path.resolve())
    shutil.copyfile(smollm2_path, d / "smol-copy.gguf")  # a third, distinct file
    return d


def make(models_dir: Path, **kw: Any) -> Runtime:
    return Runtime(make_config(model_dirs=[models_dir], ctx=1024, parallel=2, **kw))


@pytest.mark.parametrize("model", [SMOL, "gemma"])
def test_estimate_is_within_15_percent_of_measured(models_dir: Path, model: str) -> None:
    reg = make(models_dir)
    try:
        lm = load(reg, model)
        assert lm.measured > 0
        error = abs(lm.estimate.total - lm.measured) / lm.measured
        assert error < 0.15, (lm.estimate.as_dict(), lm.measured)
    finally:
        reg.close()


def test_lru_eviction_order(models_dir: Path) -> None:
    probe = make(models_dir)
    ests = {
        m: probe.scheduler.estimate_for(probe.catalog.resolve(m)).total
        for m in (SMOL, "gemma", "smol-copy")
    }
    probe.close()
    budget = ests[SMOL] + ests["gemma"] + 1_000_000  # room for two of them
    reg = make(models_dir, max_memory=budget)
    events: list[LmxEvent] = []
    reg.events.subscribe(events.append)
    try:
        reg.scheduler.lease(reg.catalog.resolve(SMOL)).release()
        reg.scheduler.lease(reg.catalog.resolve("gemma")).release()
        reg.scheduler.lease(reg.catalog.resolve(SMOL)).release()  # gemma is now the LRU
        assert ests["smol-copy"] + ests[SMOL] <= budget
        load(reg, "smol-copy")
        assert {lm.info.id for lm in reg.scheduler.loaded()} == {SMOL, "smol-copy"}
        assert [e.model for e in events if e.kind == "evicted"] == ["gemma"]
        gemma = reg.scheduler.estimate_for(reg.catalog.resolve("gemma"))
        plan = reg.scheduler.plan(gemma, exclude="gemma")
        assert plan.fits and plan.victims == [SMOL]  # the next one to go
    finally:
        reg.close()


def test_a_streaming_model_is_never_evicted(models_dir: Path) -> None:
    probe = make(models_dir)
    budget = (
        probe.scheduler.estimate_for(probe.catalog.resolve("gemma")).total + 1_000_000
    )  # one at a time
    probe.close()
    reg = make(models_dir, max_memory=budget, load_timeout=1.0)
    try:
        with ServerThread(reg) as srv:
            stream = BackgroundStream(srv.url, SMOL, 300)
            r = httpx.post(
                srv.url + "/v1/chat/completions",
                timeout=60,
                json={
                    "model": "gemma",
                    "max_tokens": 2,
                    "messages": [{"role": "user", "content": "hi"}],
                },
            )
            assert r.status_code == 503 and r.json()["error"]["code"] == "models_busy"
            chunks = stream.finish()
            assert any('"finish_reason":"length"' in c for c in chunks)  # not cut
            assert chunks[-1] == "data: [DONE]"
            r = httpx.post(
                srv.url + "/v1/chat/completions",
                timeout=60,
                json={
                    "model": "gemma",
                    "max_tokens": 2,
                    "messages": [{"role": "user", "content": "hi"}],
                },
            )
            assert r.status_code == 200  # now SMOL is idle and gets evicted
            assert [lm.info.id for lm in reg.scheduler.loaded()] == ["gemma"]
    finally:
        reg.close()


def test_model_too_large_is_refused_with_its_estimate(models_dir: Path) -> None:
    reg = make(models_dir, max_memory=50_000_000)
    try:
        with pytest.raises(ModelTooLarge, match=r"needs about \d+ MB.*budget is 50 MB"):
            load(reg, SMOL)
        assert reg.scheduler.loaded() == []
        with ServerThread(reg) as srv:
            r = httpx.post(
                srv.url + "/v1/chat/completions",
                json={"model": SMOL, "messages": [{"role": "user", "content": "hi"}]},
            )
            assert r.status_code == 507 and "insufficient_memory" in r.text
    finally:
        reg.close()


def test_keep_alive_zero_unloads_after_the_request(models_dir: Path) -> None:
    reg = make(models_dir)
    try:
        with ServerThread(reg) as srv:
            r = httpx.post(
                srv.url + "/v1/chat/completions",
                timeout=60,
                json={
                    "model": SMOL,
                    "max_tokens": 3,
                    "keep_alive": 0,
                    "messages": [{"role": "user", "content": "hi"}],
                },
            )
            assert r.status_code == 200
            wait_for(lambda: reg.scheduler.loaded() == [], 5)
            bad = httpx.post(
                srv.url + "/v1/chat/completions",
                json={
                    "model": SMOL,
                    "keep_alive": "soon",
                    "messages": [{"role": "user", "content": "hi"}],
                },
            )
            assert bad.status_code == 400 and "keep_alive" in bad.text
    finally:
        reg.close()


def test_a_dead_engine_is_unloaded_and_loaded_again(
    models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """llama.cpp fails a decode (the outermost seam: its C call); the request gets an error,
    the model is unloaded with an event, and the next request loads it again, pinned or not."""
    import llama_cpp

    reg = make(models_dir)
    reg.scheduler.pin(SMOL)
    events: list[LmxEvent] = []
    reg.events.subscribe(events.append)
    body = {"model": SMOL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    try:
        with ServerThread(reg) as srv:
            assert httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=60).is_success
            first = reg.scheduler.get(SMOL)
            real = llama_cpp.llama_decode
            monkeypatch.setattr(llama_cpp, "llama_decode", lambda ctx, batch: -3)
            r = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=60)
            assert r.status_code == 503 and "llama_decode returned -3" in r.text
            monkeypatch.setattr(llama_cpp, "llama_decode", real)
            wait_for(lambda: any(e.kind == "engine_failed" for e in events))
            r = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
            again = reg.scheduler.get(SMOL)
            assert again is not None and again is not first
            kinds = [e.kind for e in events]
            assert kinds.index("engine_failed") < kinds.index("unloaded") < len(kinds)
    finally:
        reg.close()


@pytest.fixture(scope="module")
def admin(models_dir: Path) -> Iterator[tuple[ServerThread, Runtime]]:
    reg = make(models_dir)
    with ServerThread(reg) as srv:
        yield srv, reg
    reg.close()


def test_admin_models_estimate_load_unload(admin: tuple[ServerThread, Runtime]) -> None:
    srv, _reg = admin
    listing = httpx.get(srv.url + "/admin/models").json()
    by_id = {m["id"]: m for m in listing["models"]}
    assert set(by_id) >= {SMOL, "gemma", "smol-copy"}
    assert by_id["gemma"]["memory_estimate"]["total"] > 0 and by_id["gemma"]["fits"] is True
    est = httpx.get(
        srv.url + "/admin/estimate", params={"model": "gemma", "ctx": 4096, "parallel": 2}
    ).json()
    assert est["estimate"]["ctx"] == 4096 and est["estimate"]["parallel"] == 2
    assert (
        est["estimate"]["kv_cache"]
        == 2
        * httpx.get(
            srv.url + "/admin/estimate", params={"model": "gemma", "ctx": 4096, "parallel": 1}
        ).json()["estimate"]["kv_cache"]
    )
    with httpx.stream("POST", srv.url + "/admin/models/gemma/load", timeout=60) as r:
        events = [line.split(": ", 1)[1] for line in r.iter_lines() if line.startswith("event: ")]
    assert events == ["loading", "loaded"]
    loaded = {m["id"]: m for m in httpx.get(srv.url + "/admin/models").json()["models"]}
    assert loaded["gemma"]["state"] == "ready" and loaded["gemma"]["memory_measured"] > 0
    assert loaded["gemma"]["expires_in"] is not None
    r = httpx.post(srv.url + "/admin/models/gemma/unload")
    assert r.json() == {"model": "gemma", "unloaded": True}
    assert httpx.post(srv.url + "/admin/models/nope/load").status_code == 404
    assert (
        httpx.get(srv.url + "/admin/estimate", params={"model": "gemma", "ctx": 1}).status_code
        == 400
    )


def test_admin_events_stream(admin: tuple[ServerThread, Runtime]) -> None:
    srv, reg = admin
    seen: list[str] = []
    connected = threading.Event()

    def listen() -> None:
        with httpx.stream("GET", srv.url + "/admin/events", timeout=30) as r:
            for line in r.iter_lines():
                connected.set()  # the stream opens with a comment line
                if line.startswith("event: "):
                    seen.append(line[7:])
                    if line == "event: unloaded":
                        return

    t = threading.Thread(target=listen)
    t.start()
    assert connected.wait(10)
    httpx.post(
        srv.url + "/v1/completions",
        timeout=60,
        json={"model": SMOL, "prompt": "Hello", "max_tokens": 2},
    )
    reg.scheduler.unload(SMOL)
    t.join(30)
    assert seen[:4] == ["loading", "loaded", "request", "unloaded"]


def test_metrics_parse_with_prometheus_client(admin: tuple[ServerThread, Runtime]) -> None:
    srv, _ = admin
    for _ in range(2):
        httpx.post(
            srv.url + "/v1/chat/completions",
            timeout=60,
            json={"model": SMOL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]},
        )
    httpx.post(srv.url + "/v1/chat/completions", json={"model": SMOL})  # a 400
    text = httpx.get(srv.url + "/metrics").text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    reqs = {
        (s.labels["model"], s.labels["status"]): s.value
        for s in fams["lmx_requests"].samples
        if s.name == "lmx_requests_total"
    }
    assert reqs[(SMOL, "200")] >= 2 and reqs[("", "400")] >= 1
    ttft = [
        s
        for s in fams["lmx_time_to_first_token_seconds"].samples
        if s.name.endswith("_count") and s.labels["model"] == SMOL
    ]
    assert ttft and ttft[0].value >= 2
    assert fams["lmx_models_loaded"].samples[0].value >= 1
    kinds = {s.labels["kind"] for s in fams["lmx_model_memory_bytes"].samples}
    assert kinds == {"estimate", "measured"}
    assert fams["lmx_process_resident_memory_bytes"].samples[0].value > 0
    assert "lmx_queue_depth" in fams and "lmx_generated_tokens" in fams
