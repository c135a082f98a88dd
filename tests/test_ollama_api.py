"""The Ollama API through the official `ollama` client, on the real model and server."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest

from server.runner import ServerThread
from server.runtime import Runtime
from tests.conftest import make_config, wait_for

SMOL = "smollm2-135m-instruct.q4_1"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerThread, Runtime]]:
    cfg = tmp_path_factory.mktemp("ollama-cfg") / "lmx.toml"
    cfg.write_text(
        '[presets.pirate]\nmodel = "smollm2"\nsystem = "You are a pirate."\n'
        "temperature = 0\nmax_tokens = 5\n"
    )
    rt = Runtime(make_config(cfg))
    with ServerThread(rt) as srv:
        yield srv, rt
    rt.close()


@pytest.fixture(scope="module")
def client(served: tuple[ServerThread, Runtime]) -> ollama.Client:
    return ollama.Client(host=served[0].url, timeout=120)


def test_version_tags_show(client: ollama.Client, served: Any) -> None:
    assert httpx.get(served[0].url + "/api/version").json()["version"]
    tags = client.list()
    names = [m.model for m in tags.models]
    assert f"{SMOL}:latest" in names
    m = tags.models[0]
    assert m.details and m.details.format == "gguf" and m.details.family == "llama"
    assert m.details.quantization_level == "Q4_1" and m.size and m.size > 90_000_000
    shown = client.show("smollm2:135m")  # Ollama-style names resolve to lmx ids
    assert "<|im_start|>" in (shown.template or "")
    assert shown.modelinfo and shown.modelinfo["general.architecture"] == "llama"


def test_chat_non_streaming_and_streaming(client: ollama.Client) -> None:
    r = client.chat(
        model="smollm2",
        messages=[{"role": "user", "content": "Say hello."}],
        options={"num_predict": 12, "temperature": 0},
    )
    assert r.message.role == "assistant" and r.message.content
    assert r.done and r.eval_count and r.eval_count <= 12 and r.prompt_eval_count
    parts = list(
        client.chat(
            model="smollm2",
            stream=True,
            options={"num_predict": 12, "temperature": 0},
            messages=[{"role": "user", "content": "Say hello."}],
        )
    )
    assert "".join(p.message.content or "" for p in parts) == r.message.content
    assert parts[-1].done and parts[-1].done_reason in ("stop", "length")
    assert not any(p.done for p in parts[:-1])


def test_generate_and_json_format(client: ollama.Client) -> None:
    r = client.generate(
        model=SMOL, prompt="Why is the sky blue?", options={"num_predict": 10, "seed": 3}
    )
    assert r.response and r.done and r.eval_count == 10 and r.done_reason == "length"
    s = list(
        client.generate(
            model=SMOL,
            prompt="Why is the sky blue?",
            stream=True,
            options={"num_predict": 10, "seed": 3},
        )
    )
    assert "".join(p.response for p in s) == r.response
    j = client.generate(
        model=SMOL,
        prompt="A cat as JSON with a name and an age.",
        format={
            "type": "object",
            "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
            "required": ["name", "age"],
        },
        options={"num_predict": 120, "temperature": 0},
    )
    data = json.loads(j.response)
    assert isinstance(data["name"], str) and isinstance(data["age"], int)


def test_embed_and_embeddings(client: ollama.Client) -> None:
    e = client.embed(model=SMOL, input=["first", "second one"])
    assert len(e.embeddings) == 2 and len(e.embeddings[0]) == 576
    old = client.embeddings(model=SMOL, prompt="first")
    assert max(abs(a - b) for a, b in zip(old.embedding, e.embeddings[0], strict=True)) < 1e-5


def test_ps_and_keep_alive_zero(client: ollama.Client, served: Any) -> None:
    _, reg = served
    client.generate(model=SMOL, prompt="hi", options={"num_predict": 2})
    ps = client.ps()
    assert [m.model for m in ps.models] == [f"{SMOL}:latest"] and ps.models[0].expires_at
    client.generate(model=SMOL, prompt="hi", options={"num_predict": 2}, keep_alive=0)
    wait_for(lambda: not client.ps().models)
    assert reg.scheduler.loaded() == []
    client.generate(model=SMOL, prompt="", keep_alive="10m")  # empty prompt: just load
    assert [m.model for m in client.ps().models] == [f"{SMOL}:latest"]
    client.chat(model=SMOL, messages=[], keep_alive=0)  # empty chat + 0: unload
    assert client.ps().models == []


def test_errors_in_ollama_shape(client: ollama.Client, served: Any) -> None:
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 404 and "no-such-model" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.pull("llama3")
    assert e.value.status_code == 501 and "hf.co/ORG/REPO" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.delete(SMOL)  # the bundled model is used in place: lmx does not delete it
    assert e.value.status_code == 400 and "used in place" in e.value.error
    r = httpx.post(served[0].url + "/api/chat", content=b"{nope", timeout=10)
    assert r.status_code == 400 and set(r.json()) == {"error"}
    r = httpx.post(
        served[0].url + "/api/generate",
        timeout=10,
        json={"model": SMOL, "prompt": "x", "keep_alive": "later"},
    )
    assert r.status_code == 400 and "duration" in r.json()["error"]
    r = httpx.post(
        served[0].url + "/api/generate", timeout=10, json={"model": SMOL, "prompt": "x " * 5000}
    )
    assert r.status_code == 400 and "context length" in r.json()["error"]


def test_tags_digest_is_the_sha256_of_the_file(client: ollama.Client, smollm2_path: Path) -> None:
    want = hashlib.sha256(smollm2_path.read_bytes()).hexdigest()
    digests = {m.model: m.digest for m in client.list().models}
    assert digests[f"{SMOL}:latest"] == want
    assert digests[f"{SMOL}:latest"] == want  # the second listing reads the cached value


def test_show_lists_capabilities(client: ollama.Client) -> None:
    caps = client.show(SMOL).capabilities or []
    assert "completion" in caps and "embedding" in caps


def test_presets_work_on_the_ollama_api(client: ollama.Client, served: Any) -> None:
    r = client.chat(model="pirate", messages=[{"role": "user", "content": "Hello!"}])
    assert r.eval_count == 5  # the preset's max_tokens, with its system prompt and temperature
    plain = client.chat(
        model=SMOL,
        messages=[
            {"role": "system", "content": "You are a pirate."},
            {"role": "user", "content": "Hello!"},
        ],
        options={"temperature": 0, "num_predict": 5},
    )
    assert r.message.content == plain.message.content


@pytest.mark.parametrize(
    ("option", "value"),
    [("repeat_penalty", 0), ("top_k", -5), ("temperature", 3), ("top_p", 1.5), ("min_p", -1)],
)
def test_options_are_bounded_as_on_v1(
    client: ollama.Client, served: Any, option: str, value: float
) -> None:
    r = httpx.post(
        served[0].url + "/api/generate",
        timeout=30,
        json={"model": SMOL, "prompt": "x", "stream": False, "options": {option: value}},
    )
    assert r.status_code == 400, r.text
    assert set(r.json()) == {"error"} and option in r.json()["error"]
