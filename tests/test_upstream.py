"""lmx in front of other OpenAI-compatible servers: a second lmx (fixture `peer`, and ones a
test starts and stops), and llama-cpp-python's own server. Their models are listed in every
dialect, requests reach them unchanged in every dialect, usage lands in the metrics, a client
that leaves cancels upstream, a server that is down answers 502 at once and is listed as
unreachable, and a managed upstream (`cmd`) starts on first use and stops after keep_alive.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.cli import main
from server.discovery import ModelInfo
from server.runner import ServerThread
from server.runtime import Runtime
from tests.conftest import make_config, serving_url, wait_for

SMOL = "smollm2-135m-instruct.q4_1"
MODEL = "peer/" + SMOL  # the peer's SmolLM2, under the upstream's prefix
HI = [{"role": "user", "content": "Say hello."}]
LMX = [sys.executable, "-m", "server.cli"]


@pytest.fixture(scope="module")
def front(
    peer: tuple[Runtime, ServerThread], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Runtime, ServerThread]]:
    """An lmx with its own SmolLM2 and the peer's under the prefix `peer/`, one local model
    loaded at most."""
    cfg = tmp_path_factory.mktemp("front") / "lmx.toml"
    cfg.write_text(f'[upstreams.peer]\nurl = "{peer[1].url}"\nprefix = "peer/"\n')
    rt = Runtime(make_config(cfg, max_loaded_models=1))
    with ServerThread(rt) as srv:
        yield rt, srv
    rt.close()


def oai(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def dead_port() -> tuple[socket.socket, int]:
    """A port bound but never listening: connections are refused at once."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    return s, s.getsockname()[1]


def metric(url: str, family: str, sample: str, **labels: str) -> float:
    fams = {f.name: f for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)}
    if family not in fams:
        return 0.0
    return sum(
        s.value
        for s in fams[family].samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    )


def lmx_ls(url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> str:
    """`lmx ls` as a client of the server at `url`."""
    monkeypatch.setenv("LMX_HOST", url)
    capsys.readouterr()
    main(["ls"])
    return capsys.readouterr().out


# ----- listed ------------------------------------------------------------------------------


def test_upstream_models_are_listed_in_every_dialect(
    front: tuple[Runtime, ServerThread],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = front[1].url
    cards = {m["id"]: m for m in httpx.get(url + "/v1/models").json()["data"]}
    assert cards[SMOL]["lmx"]["source"] == "default"  # the local one keeps its id
    up = cards[MODEL]["lmx"]
    assert (up["source"], up["format"], up["upstream"]["name"]) == ("upstream", "upstream", "peer")
    assert up["upstream"]["model"] == SMOL and up["usable"]
    tags = {m["name"]: m for m in httpx.get(url + "/api/tags").json()["models"]}
    assert tags[MODEL + ":latest"]["details"]["format"] == "upstream"
    monkeypatch.setenv("LMX_HOST", url)
    capsys.readouterr()
    main(["ls", "--json"])
    listed = {m["id"]: m for m in json.loads(capsys.readouterr().out)}
    assert listed[MODEL]["source"] == "upstream" and listed[MODEL]["upstream"]["reachable"]
    row = next(line for line in lmx_ls(url, monkeypatch, capsys).splitlines() if MODEL in line)
    assert row.split()[-2:] in (["upstream", "available"], ["upstream", "ready"])


# ----- every dialect, unchanged -------------------------------------------------------------


def test_openai_clients_get_the_upstreams_answer_unchanged(
    front: tuple[Runtime, ServerThread], peer: tuple[Runtime, ServerThread]
) -> None:
    via, direct = oai(front[1].url), oai(peer[1].url)
    ask: dict[str, Any] = {"messages": HI, "max_tokens": 8, "temperature": 0}
    a = via.chat.completions.create(model=MODEL, **ask)
    b = direct.chat.completions.create(model=SMOL, **ask)
    assert a.model == MODEL and a.choices[0].message.content == b.choices[0].message.content
    assert a.choices[0].finish_reason == b.choices[0].finish_reason
    assert a.usage is not None and b.usage is not None
    assert (a.usage.prompt_tokens, a.usage.completion_tokens) == (
        b.usage.prompt_tokens,
        b.usage.completion_tokens,
    )
    chunks = list(
        via.chat.completions.create(
            model=MODEL, stream=True, stream_options={"include_usage": True}, **ask
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == b.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == b.usage.prompt_tokens
    # Text completions, streamed and not.
    t = via.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0)
    u = direct.completions.create(
        model=SMOL, prompt="Once upon a time", max_tokens=6, temperature=0
    )
    assert t.choices[0].text == u.choices[0].text != ""
    streamed = via.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == u.choices[0].text


def test_ollama_clients_talk_to_an_upstream_model(
    front: tuple[Runtime, ServerThread], peer: tuple[Runtime, ServerThread]
) -> None:
    via = ollama.Client(host=front[1].url, timeout=120)
    expected = oai(peer[1].url).chat.completions.create(
        model=SMOL, messages=HI, max_tokens=8, temperature=0
    )
    options = {"temperature": 0, "num_predict": 8}
    r = via.chat(model=MODEL, messages=HI, options=options)
    assert r.message.content == expected.choices[0].message.content
    assert expected.usage is not None
    assert r.done and r.prompt_eval_count == expected.usage.prompt_tokens
    parts = [
        p.message.content for p in via.chat(model=MODEL, messages=HI, options=options, stream=True)
    ]
    assert "".join(p or "" for p in parts) == expected.choices[0].message.content
    g = via.generate(model=MODEL, prompt="Say hello.", options=options)
    assert g.response == expected.choices[0].message.content
    raw = via.generate(model=MODEL, prompt="Once upon a time", raw=True, options=options)
    assert raw.response and raw.eval_count == 8


def test_structured_output_passes_through(front: tuple[Runtime, ServerThread]) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}},
        "required": ["name"],
    }
    r = oai(front[1].url).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Give me a name as JSON."}],
        max_tokens=40,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}},
    )
    assert isinstance(json.loads(r.choices[0].message.content or "")["name"], str)
    g = ollama.Client(host=front[1].url, timeout=120).generate(
        model=MODEL, prompt="A name as JSON.", format=schema, options={"num_predict": 40}
    )
    assert isinstance(json.loads(g.response)["name"], str)


def test_lmx_run_uses_an_upstream_model(
    front: tuple[Runtime, ServerThread],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    direct = oai(front[1].url).chat.completions.create(
        model=MODEL, messages=HI, max_tokens=6, temperature=0
    )
    monkeypatch.setenv("LMX_HOST", front[1].url)
    capsys.readouterr()
    main(["run", MODEL, "Say hello.", "--max-tokens", "6", "--temperature", "0"])
    assert capsys.readouterr().out.strip() == (direct.choices[0].message.content or "").strip()


# ----- metrics, cancellation, errors, memory -------------------------------------------------


def test_usage_is_recorded_in_the_metrics(front: tuple[Runtime, ServerThread]) -> None:
    url = front[1].url
    before = metric(url, "lmx_prompt_tokens", "lmx_prompt_tokens_total", model=MODEL)
    ok = metric(url, "lmx_requests", "lmx_requests_total", model=MODEL, status="200")
    gen = metric(url, "lmx_generated_tokens", "lmx_generated_tokens_total", model=MODEL)
    r = oai(url).chat.completions.create(model=MODEL, messages=HI, max_tokens=5, temperature=0)
    assert r.usage is not None and r.usage.prompt_tokens > 0
    after = metric(url, "lmx_prompt_tokens", "lmx_prompt_tokens_total", model=MODEL)
    assert after - before == r.usage.prompt_tokens
    assert metric(url, "lmx_requests", "lmx_requests_total", model=MODEL, status="200") == ok + 1
    assert (
        metric(url, "lmx_generated_tokens", "lmx_generated_tokens_total", model=MODEL) - gen
        == r.usage.completion_tokens
    )


def test_a_client_that_leaves_cancels_the_upstream_request(
    front: tuple[Runtime, ServerThread], peer: tuple[Runtime, ServerThread]
) -> None:
    oai(front[1].url).chat.completions.create(model=MODEL, messages=HI, max_tokens=1)
    peer_lm = peer[0].scheduler.get(SMOL)
    assert peer_lm is not None and peer_lm.engine is not None
    engine = peer_lm.engine
    before = engine.stats()["finished"].get("cancelled", 0)
    body = {"model": MODEL, "messages": HI, "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", front[1].url + "/v1/chat/completions", json=body, timeout=120) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(4)]
        assert any(line.startswith("data: {") for line in got)
    wait_for(lambda: engine.stats()["finished"].get("cancelled", 0) > before, 60)
    wait_for(
        lambda: any(rec.status == 499 and rec.model == MODEL for rec in front[0].requests.recent())
    )


def test_an_upstream_refusal_keeps_its_4xx_in_each_dialect(
    front: tuple[Runtime, ServerThread],
) -> None:
    url = front[1].url
    long = [{"role": "user", "content": "word " * 3000}]  # more than the peer's 1024 tokens
    r = httpx.post(
        url + "/v1/chat/completions", json={"model": MODEL, "messages": long}, timeout=60
    )
    assert r.status_code == 400
    assert "maximum context length" in r.json()["error"]["message"]
    assert r.json()["error"]["code"] == "upstream_error"
    o = httpx.post(
        url + "/api/chat", json={"model": MODEL, "messages": long, "stream": False}, timeout=60
    )
    assert o.status_code == 400 and "maximum context length" in o.json()["error"]


def test_an_upstream_model_costs_no_memory_and_never_evicts_a_local_one(
    front: tuple[Runtime, ServerThread],
) -> None:
    rt, srv = front
    oai(srv.url).chat.completions.create(model=SMOL, messages=HI, max_tokens=1)  # the local one
    oai(srv.url).chat.completions.create(model=MODEL, messages=HI, max_tokens=1)
    loaded = {lm.info.id for lm in rt.scheduler.loaded()}
    assert {SMOL, MODEL} <= loaded  # max_loaded_models is 1: the upstream one is not counted
    est = httpx.get(srv.url + "/admin/estimate", params={"model": MODEL}).json()
    assert est["estimate"]["total"] == 0 and est["would_evict"] == []
    # Ollama's unload (keep_alive 0) closes the upstream model's client, as any model's.
    httpx.post(srv.url + "/api/generate", json={"model": MODEL, "keep_alive": 0}, timeout=30)
    assert rt.scheduler.state_of(MODEL) == "available" and rt.scheduler.get(SMOL) is not None


# ----- an upstream that is down ------------------------------------------------------------


DIALECTS: list[tuple[str, dict[str, Any], str]] = [
    ("/v1/chat/completions", {"messages": HI}, "openai"),
    ("/v1/chat/completions", {"messages": HI, "stream": True}, "openai"),
    ("/v1/completions", {"prompt": "Once"}, "openai"),
    ("/api/chat", {"messages": HI}, "ollama"),
    ("/api/generate", {"prompt": "Once"}, "ollama"),
]


def assert_502_in_each_dialect(url: str, model: str) -> None:
    for path, body, dialect in DIALECTS:
        # A deadline, not a timing: a request for a down upstream must never hang.
        r = httpx.post(url + path, json={"model": model, **body}, timeout=15)
        assert r.status_code == 502, (path, r.text)
        err = r.json()["error"]
        if dialect == "openai":
            assert err["code"] == "upstream_unavailable" and "does not answer" in err["message"]
        else:
            assert isinstance(err, str) and "does not answer" in err


def test_a_down_upstream_answers_502_in_each_dialect_and_is_listed_unreachable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    sock, port = dead_port()
    cfg = tmp_path / "lmx.toml"
    cfg.write_text(
        f'[upstreams.gpu]\nurl = "http://127.0.0.1:{port}"\nmodels = ["Big-Model"]\n'
        'prefix = "gpu/"\n'
    )
    rt = Runtime(make_config(cfg, upstream=[f"http://127.0.0.1:{port}/v1"]))
    try:
        with ServerThread(rt) as srv:
            ids = {m["id"] for m in httpx.get(srv.url + "/v1/models").json()["data"]}
            assert "gpu/big-model" not in ids  # not usable now: not offered
            assert_502_in_each_dialect(srv.url, "gpu/big-model")
            assert_502_in_each_dialect(srv.url, f"127.0.0.1:{port}")  # never reached: no models
            out = lmx_ls(srv.url, monkeypatch, capsys)
            row = next(line for line in out.splitlines() if line.startswith("gpu/big-model"))
            assert row.split()[-2:] == ["upstream", "unreachable"]
            assert f"gpu/big-model: unreachable: upstream gpu at http://127.0.0.1:{port}/v1" in out
    finally:
        rt.close()
        sock.close()


async def test_the_app_shows_a_down_upstream_as_unreachable() -> None:
    from lmx_tui.app import LmxApp
    from tests.test_tui import frozen_system, table_rows, until

    sock, port = dead_port()
    rt = Runtime(make_config(upstream=[f"gpu=http://127.0.0.1:{port}"]))
    try:
        app = LmxApp(rt, system_sampler=frozen_system())
        async with app.run_test(size=(100, 30)) as pilot:

            def row() -> list[str]:
                return next(r for r in table_rows(app, "#model-table") if r[0] == "gpu")

            await until(pilot, lambda: row()[1] == "unreachable")
    finally:
        rt.close()
        sock.close()


def test_lmx_run_in_process_fails_fast_on_a_down_upstream(
    capsys: pytest.CaptureFixture[str],
) -> None:
    sock, port = dead_port()
    try:
        with pytest.raises(SystemExit) as e:
            main(["run", "--upstream", f"http://127.0.0.1:{port}", f"127.0.0.1:{port}", "hi"])
        assert e.value.code == 2
        assert "does not answer" in capsys.readouterr().err
    finally:
        sock.close()


def listed(rt: Runtime) -> ModelInfo:
    info = rt.catalog.get(SMOL)
    assert info is not None
    return info


def test_an_upstream_that_goes_down_and_comes_back() -> None:
    back = Runtime(make_config(parallel=1, ctx=512))
    srv = ServerThread(back).start()
    port = srv.port
    rt = Runtime(make_config(upstream=[f"back={srv.url}"], include_default_model=False))
    try:
        with ServerThread(rt) as front:
            client = oai(front.url)
            assert client.chat.completions.create(model=SMOL, messages=HI, max_tokens=2).choices
            srv.stop()
            back.close()
            # Loaded, and now down: refused before anything streams, as a gateway does.
            r = httpx.post(
                front.url + "/v1/chat/completions",
                json={"model": SMOL, "messages": HI, "stream": True},
                timeout=15,
            )
            assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_unavailable"
            wait_for(lambda: listed(rt).unreachable)
            back = Runtime(make_config(parallel=1, ctx=512, port=port))
            srv = ServerThread(back).start()
            assert client.chat.completions.create(model=SMOL, messages=HI, max_tokens=2).choices
            wait_for(lambda: listed(rt).usable)
    finally:
        rt.close()
        srv.stop()
        back.close()


# ----- a managed upstream (cmd) ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def answers(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_managed_upstream_starts_on_first_use_and_stops_after_keep_alive(
    tmp_path: Path,
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = " ".join([*LMX, "--no-ui", "--port", str(port), "--parallel", "1", "--ctx", "512"])
    cfg = tmp_path / "lmx.toml"
    cfg.write_text(
        f'[upstreams.spare]\nurl = "{url}"\ncmd = "{cmd}"\nmodels = ["{SMOL}"]\n'
        'prefix = "spare/"\nkeep_alive = "1s"\n'
    )
    rt = Runtime(make_config(cfg))
    try:
        server = rt.upstreams.servers()["spare"]
        info = rt.catalog.resolve("spare/" + SMOL)
        assert info.usable and not server.running and not answers(url)  # listed, not started
        with ServerThread(rt) as front:
            r = oai(front.url).chat.completions.create(
                model="spare/" + SMOL, messages=HI, max_tokens=4, temperature=0
            )
            assert r.choices[0].message.content and r.usage is not None
            assert server.running  # started by that request ...
            # ... and stopped once keep_alive unloads its model.
            wait_for(lambda: rt.scheduler.state_of("spare/" + SMOL) == "available", 60)
            assert not server.running and not answers(url)
    finally:
        rt.close()
    assert not server.running


def test_settings_name_upstreams_by_flag_and_by_section(tmp_path: Path) -> None:
    from server.settings import ConfigError, build_settings

    cfg = tmp_path / "lmx.toml"
    cfg.write_text('[upstreams.vllm]\nurl = "http://gpu:8000/v1"\napi_key = "k"\nprefix = "g/"\n')
    s = build_settings(
        path=cfg,
        env={"LMX_UPSTREAM": "http://other:9000"},
        flags={"upstream": ["vllm=https://gpu2:8000/v1/", "ray=http://ray:8000"]},
    )
    ups = s.upstream_configs()
    assert ups["vllm"].url == "https://gpu2:8000/v1" and ups["vllm"].api_key == "k"  # flag wins
    assert ups["ray"].url == "http://ray:8000/v1"  # a bare host gets /v1
    assert ups["other:9000"].url == "http://other:9000/v1"
    with pytest.raises(ConfigError, match="http:// or https://"):
        build_settings(env={}, flags={"upstream": ["gpu:8000"]})
    cfg.write_text('[upstreams.x]\nurl = "http://x:1"\ncmd = "vllm serve m"\n')
    with pytest.raises(ConfigError, match="needs its `models` listed"):
        build_settings(path=cfg, env={})


# ----- in front of llama-cpp-python's own server -------------------------------------------


@pytest.fixture(scope="module")
def llama_cpp_server(smollm2_path: Path) -> Iterator[str]:
    """llama-cpp-python's OpenAI server over the same SmolLM2 file."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(smollm2_path),
            "--model_alias",
            "smollm2",
            "--port",
            str(port),
            "--n_ctx",
            "1024",
            "--n_threads",
            "2",
            "--chat_format",
            "chatml",
            # Its default cuts a stream short (a bare [DONE]) whenever another request waits,
            # such as lmx's reachability probe of /v1/models; lmx rightly calls that an error.
            "--interrupt_requests",
            "False",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def up() -> bool:
            assert proc.poll() is None, "llama_cpp.server exited"
            try:
                return httpx.get(url + "/v1/models", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, 120)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def test_lmx_serves_a_llama_cpp_python_server_to_openai_and_ollama_clients(
    llama_cpp_server: str,
) -> None:
    proc = subprocess.Popen(
        [*LMX, "--no-ui", "--port", "0", "--upstream", f"llama={llama_cpp_server}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ},
    )
    try:
        assert proc.stdout is not None
        url = serving_url(proc.stdout)
        ids = [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
        assert "smollm2" in ids
        direct = oai(llama_cpp_server).chat.completions.create(
            model="smollm2", messages=HI, max_tokens=8, temperature=0
        )
        expected = direct.choices[0].message.content
        via = oai(url)
        got = via.chat.completions.create(model="smollm2", messages=HI, max_tokens=8, temperature=0)
        assert got.choices[0].message.content == expected
        stream = via.chat.completions.create(
            model="smollm2", messages=HI, max_tokens=8, temperature=0, stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected
        o = ollama.Client(host=url, timeout=120).chat(
            model="smollm2", messages=HI, options={"temperature": 0, "num_predict": 8}
        )
        assert o.message.content == expected
    finally:
        proc.terminate()
        proc.wait(30)


def test_admin_actions_take_a_model_id_with_a_slash(front: tuple[Runtime, ServerThread]) -> None:
    """`peer/...` written as is and with %2F (which the server decodes before routing)."""
    _, srv = front
    quoted = MODEL.replace("/", "%2F")
    for path in (MODEL, quoted):
        r = httpx.post(f"{srv.url}/admin/models/{path}/load", timeout=120)
        assert r.status_code == 200 and "event: loaded" in r.text, r.text
        r = httpx.post(f"{srv.url}/admin/models/{path}/pin")
        assert r.json() == {"model": MODEL, "pinned": True}
        r = httpx.post(f"{srv.url}/admin/models/{path}/unpin")
        assert r.json() == {"model": MODEL, "pinned": False}
        r = httpx.post(f"{srv.url}/admin/models/{path}/unload")
        assert r.json() == {"model": MODEL, "unloaded": True}
    r = httpx.post(f"{srv.url}/admin/models/peer%2Fnosuch/load")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(f"{srv.url}/admin/models/{quoted}/frobnicate")
    assert r.status_code == 404 and "No route" in r.json()["error"]["message"]
    r = httpx.delete(f"{srv.url}/admin/models/{quoted}")  # an upstream's model is not a file
    assert 400 <= r.status_code < 500, r.text
