"""MLX models beyond the shared engine tests: the converted model answers as llama.cpp does,
discovery (model dirs, the Hugging Face cache, unusable directories), the safetensors reader,
memory estimates, load failures, and the whole HTTP path (OpenAI and Ollama clients)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.discovery import describe_file, describe_mlx_dir, discover, scan_hf_cache
from server.engines import create_engine
from server.engines.base import EngineOptions, GenerationRequest, SamplingParams, collect
from server.errors import EngineFailure, InvalidRequest
from server.events import LmxEvent
from server.gguf import read_gguf
from server.grammar import json_grammar
from server.memory import estimate, estimate_by_format
from server.runner import ServerThread
from server.runtime import Runtime
from server.safetensors import SafetensorsError, read_safetensors
from tests.conftest import REAL_HOME, make_config
from tests.mlx_model import f32_gguf_for

MLX_ID = "mlx-community/smollm2-135m-instruct-4bit"
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def linked_copy(src: Path, dst: Path, files: tuple[str, ...] = MODEL_FILES) -> Path:
    """A real folder whose files link to the converted model's (discovery walks real folders)."""
    dst.mkdir(parents=True)
    for name in files:
        (dst / name).symlink_to(src / name)
    return dst


# ----- the same model on both engines ------------------------------------------------------


def test_converted_model_answers_like_llamacpp_on_the_same_weights(
    smollm2_path: Path, smollm2_mlx_dir: Path
) -> None:
    # llama.cpp multiplies Q4_1 weights by activations it rounds to 8 bits, MLX in float, so on
    # the Q4_1 file their answers part where two tokens are nearly tied. On the same weights
    # dequantized to F32, llama.cpp computes what MLX computes: token for token.
    cache = Path(os.environ.get("LMX_TEST_CACHE", REAL_HOME / ".cache" / "lmx-tests"))
    f32 = f32_gguf_for(smollm2_path, cache)
    opts = EngineOptions(n_ctx=512, parallel=1, threads=2)
    llama = create_engine(describe_file("f32", f32, "test"), opts)
    mlx = create_engine(describe_mlx_dir("mlx", smollm2_mlx_dir, "test"), opts)
    llama.load()
    mlx.load()
    try:
        for question in ("What is the capital of France?", "Write a haiku about the sea."):
            messages = [{"role": "user", "content": question}]
            prompt = llama.format_chat(messages)
            assert mlx.format_chat(messages) == prompt
            req = GenerationRequest(prompt, 40, SamplingParams(temperature=0))
            a, fa = collect(llama, req)
            b, fb = collect(mlx, req)
            assert (b, fb.reason, fb.completion_tokens) == (a, fa.reason, fa.completion_tokens)
            assert fa.completion_tokens > 5
    finally:
        llama.close()
        mlx.close()


# ----- discovery ---------------------------------------------------------------------------


def test_mlx_dirs_are_discovered_and_bad_ones_listed_with_the_reason(
    smollm2_mlx_dir: Path, smollm2_path: Path, tmp_path: Path
) -> None:
    src = smollm2_mlx_dir
    root = tmp_path / "models"
    linked_copy(src, root / "mlx-community" / "SmolLM2-135M-Instruct-4bit")
    bad = linked_copy(src, root / "bad-config", ("model.safetensors", "tokenizer.json"))
    (bad / "config.json").write_text("{not json")
    linked_copy(src, root / "no-weights", ("config.json", "tokenizer.json"))
    linked_copy(src, root / "no-tokenizer", ("config.json", "model.safetensors"))
    cut = linked_copy(src, root / "truncated", ("config.json", "tokenizer.json"))
    with (src / "model.safetensors").open("rb") as f:
        (cut / "model.safetensors").write_bytes(f.read(200_000))
    shards = linked_copy(src, root / "missing-shard", ("config.json", "tokenizer.json"))
    (shards / "model-00001-of-00002.safetensors").symlink_to(src / "model.safetensors")
    index = {
        "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",
        }
    }
    (shards / "model.safetensors.index.json").write_text(json.dumps(index))
    untyped = linked_copy(src, root / "no-model-type", ("model.safetensors", "tokenizer.json"))
    (untyped / "config.json").write_text("{}")
    # A GGUF repository with its tokenizer files beside it is a GGUF model, not a broken MLX one.
    gguf_repo = linked_copy(src, root / "gguf-repo", ("config.json", "tokenizer.json"))
    (gguf_repo / "model.gguf").symlink_to(smollm2_path)

    models = {m.id: m for m in discover([root], include_default=False, include_hf_cache=False)}
    assert set(models) == {
        MLX_ID,
        "bad-config",
        "no-weights",
        "no-tokenizer",
        "truncated",
        "missing-shard",
        "no-model-type",
        "gguf-repo/model",
    }
    m = models[MLX_ID]
    header = read_gguf(smollm2_path)
    assert m.usable and m.format == "mlx" and m.source == f"dir:{root}"
    assert m.describe() | {"path": None} == {
        "id": MLX_ID,
        "path": None,
        "source": f"dir:{root}",
        "format": "mlx",
        "size_bytes": (src / "model.safetensors").stat().st_size,
        "usable": True,
        "error": None,
        "architecture": "llama",
        "parameters": header.parameter_count,
        "quantization": "4bit",
        "context_length": 8192,
        "aliases": [],
        "upstream": None,
    }
    assert m.chat_template == header.chat_template
    reasons = {k: v.error for k, v in models.items() if not v.usable}
    assert all(models[k].format == "mlx" for k in reasons)
    assert "config.json is not valid JSON" in (reasons["bad-config"] or "")
    assert reasons["no-weights"] == "no model*.safetensors weights"
    assert "no tokenizer" in (reasons["no-tokenizer"] or "")
    assert "truncated" in (reasons["truncated"] or "")
    assert "model-00002-of-00002.safetensors" in (reasons["missing-shard"] or "")
    assert "model_type" in (reasons["no-model-type"] or "")
    assert models["gguf-repo/model"].format == "gguf"


def test_a_model_dir_that_is_an_mlx_dir_is_named_after_its_folder(
    smollm2_mlx_dir: Path, tmp_path: Path
) -> None:
    folder = linked_copy(smollm2_mlx_dir, tmp_path / "SmolLM2-MLX")
    models = discover([folder], include_default=False, include_hf_cache=False)
    assert [(m.id, m.format, m.usable) for m in models] == [("smollm2-mlx", "mlx", True)]


def hf_cache_with_mlx_repo(src: Path, cache: Path, *, real_blobs: bool = False) -> Path:
    """huggingface_hub's layout (snapshot links into blobs) holding the converted model; its
    blobs link to `src`'s files, or are files of their own (hard links) with `real_blobs`."""
    base = cache / "models--mlx-community--SmolLM2-135M-Instruct-4bit"
    commit = "b" * 40
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    (base / "blobs").mkdir()
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    for i, name in enumerate(MODEL_FILES):
        blob = base / "blobs" / f"{i:064x}"
        if not real_blobs:
            blob.symlink_to(src / name)
        else:
            try:
                os.link((src / name).resolve(), blob)
            except OSError:  # another file system
                shutil.copyfile(src / name, blob)
        (snap / name).symlink_to(os.path.relpath(blob, snap))
    return snap


def test_mlx_repos_in_the_hf_cache_are_used_in_place(smollm2_mlx_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    snap = hf_cache_with_mlx_repo(smollm2_mlx_dir, cache)
    models = scan_hf_cache(cache)
    assert [(m.id, m.source, m.format, m.usable) for m in models] == [
        (MLX_ID, "hf-cache", "mlx", True)
    ]
    assert models[0].path == snap
    assert models[0].quantization == "4bit"


def test_an_mlx_repo_is_removed_from_the_hf_cache_with_its_blobs(
    smollm2_mlx_dir: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "hub"
    snap = hf_cache_with_mlx_repo(smollm2_mlx_dir, cache, real_blobs=True)
    rt = Runtime(make_config(hf_cache=True, hf_cache_dir=cache))
    try:
        info = rt.catalog.resolve(MLX_ID)
        assert info.format == "mlx"
        # A folder's digest covers its files (here known from their blob names).
        digest = rt.catalog.digest(info)
        assert len(digest) == 64 and digest == rt.catalog.digest(info)
        assert rt.models.remove(MLX_ID) == snap
        assert not snap.exists()
        assert list((snap.parent.parent / "blobs").iterdir()) == []
        assert MLX_ID not in {m.id for m in rt.catalog.models()}
    finally:
        rt.close()


def test_mlx_dirs_are_unusable_without_the_engine(
    smollm2_mlx_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # mlx-lm not installed (a Linux install without the extra): listed, with what to install.
    monkeypatch.setitem(sys.modules, "mlx_lm", None)
    info = describe_mlx_dir("x", smollm2_mlx_dir, "test")
    assert not info.usable and "opta-lmx[mlx]" in (info.error or "")
    assert info.architecture == "llama"


# ----- safetensors headers and memory --------------------------------------------------------


def test_safetensors_header_is_read_without_the_data(smollm2_mlx_dir: Path, tmp_path: Path) -> None:
    path = smollm2_mlx_dir / "model.safetensors"
    h = read_safetensors(path)
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert h.data_bytes == path.stat().st_size - 8 - n
    assert h.metadata == {"format": "mlx"}
    q = h.tensors["model.layers.0.self_attn.q_proj.weight"]
    assert (q.dtype, q.shape) == ("U32", (576, 576 * 4 // 32))
    bad = tmp_path / "bad.safetensors"
    for data, reason in [
        (b"", "too short"),
        (struct.pack("<Q", 10**12) + b"{}", "does not fit"),
        (struct.pack("<Q", 4) + b"nope", "not JSON"),
        (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
        (path.read_bytes()[: 8 + n + 100], "truncated"),
    ]:
        bad.write_bytes(data)
        with pytest.raises(SafetensorsError, match=reason):
            read_safetensors(bad)


def test_memory_estimate_dispatches_by_format(smollm2_mlx_dir: Path, smollm2_path: Path) -> None:
    gguf = describe_file("g", smollm2_path, "test")
    assert gguf.header is not None
    assert estimate_by_format(gguf, 1024, 2) == estimate(gguf.header, 1024, 2)
    info = describe_mlx_dir("m", smollm2_mlx_dir, "test")
    est = estimate_by_format(info, 1000, 3)
    assert est.weights == read_safetensors(smollm2_mlx_dir / "model.safetensors").data_bytes
    # 30 layers x 3 KV heads x 64 dims x (K, V) x float32, for 1000 tokens rounded up to 1024
    assert est.kv_cache == 30 * 3 * 64 * 2 * 4 * 1024 * 3
    assert (est.ctx, est.parallel) == (1000, 3)
    assert estimate_by_format(info, 10**6, 1).ctx == 8192  # never past the trained context
    broken = describe_mlx_dir("b", smollm2_mlx_dir / "nothing", "test")
    with pytest.raises(ValueError, match="no metadata"):
        estimate_by_format(broken, 1024, 1)


def test_kv_estimate_matches_mlx_lm_cache(smollm2_mlx_dir: Path) -> None:
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model

    model, _ = load_model(smollm2_mlx_dir)
    try:
        cache = make_prompt_cache(model)
        model(mx.array([[1] * 20]), cache=cache)
        mx.eval([c.state for c in cache])
        used = sum(c.nbytes for c in cache)
    finally:
        # MLX's rule for a thread done with it (here the test's): free what it made, then its
        # streams, or the process can crash at exit.
        del model, cache
        mx.clear_streams()
    info = describe_mlx_dir("m", smollm2_mlx_dir, "test")
    assert estimate_by_format(info, 20, 1).kv_cache == used  # one 256-token step


# ----- loading -------------------------------------------------------------------------------


def test_unknown_architecture_fails_to_load_with_the_reason(
    smollm2_mlx_dir: Path, tmp_path: Path
) -> None:
    folder = linked_copy(smollm2_mlx_dir, tmp_path / "odd", MODEL_FILES[1:])
    config = json.loads((smollm2_mlx_dir / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"model_type": "nosuchmodel"}))
    info = describe_mlx_dir("odd", folder, "test")
    assert info.usable  # discovery does not import MLX; loading says what is wrong
    eng = create_engine(info, EngineOptions(n_ctx=256, parallel=1))
    with pytest.raises(EngineFailure, match="nosuchmodel not supported"):
        eng.load()
    with pytest.raises(EngineFailure):
        eng.submit(GenerationRequest([1, 2], 2), lambda ev: None)


def test_grammar_without_llguidance_is_a_clear_400(
    smollm2_mlx_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "llguidance", None)
    eng = create_engine(describe_mlx_dir("m", smollm2_mlx_dir, "test"), EngineOptions(n_ctx=256))
    assert eng.supports_grammar is False  # type: ignore[attr-defined]
    eng.load()
    try:
        with pytest.raises(InvalidRequest, match="llguidance") as e:
            req = GenerationRequest(
                [1, 2], 4, grammar=json_grammar(None), grammar_param="response_format"
            )
            eng.submit(req, lambda ev: None)
        assert e.value.status == 400 and e.value.param == "response_format"
    finally:
        eng.close()


# ----- the whole path: runtime, HTTP, the published clients --------------------------------------


@pytest.fixture(scope="module")
def mlx_server(
    smollm2_mlx_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerThread, Runtime]]:
    root = tmp_path_factory.mktemp("mlx-models")
    linked_copy(smollm2_mlx_dir, root / "mlx-community" / "SmolLM2-135M-Instruct-4bit")
    import mlx_lm.generate  # noqa: F401  (imported before the load: `measured` is the model's)

    rt = Runtime(make_config(model_dirs=[root], ctx=512, parallel=2))
    with ServerThread(rt) as srv:
        yield srv, rt
    rt.close()


def test_openai_client_chats_with_an_mlx_model(mlx_server: tuple[ServerThread, Runtime]) -> None:
    import openai

    srv, rt = mlx_server
    events: list[LmxEvent] = []
    unsubscribe = rt.events.subscribe(events.append)
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=300)
    assert MLX_ID in [m.id for m in client.models.list().data]
    messages: Any = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(
        model=MLX_ID, messages=messages, max_tokens=12, temperature=0
    )
    unsubscribe()
    text = r.choices[0].message.content or ""
    assert "Paris" in text and r.choices[0].finish_reason == "stop"
    lm = rt.scheduler.get(MLX_ID)
    assert lm is not None and lm.engine is not None
    assert r.usage is not None
    assert r.usage.prompt_tokens == len(lm.engine.format_chat(messages))
    assert r.usage.completion_tokens == len(lm.engine.tokenize(text, add_special=False))
    assert [e.kind for e in events if e.model == MLX_ID][:2] == ["loading", "loaded"]
    # What is resident after the load is near the weights and within the full estimate (the KV
    # cache grows as the context fills). Resident memory is sampled from the process, and pages
    # of the mapped safetensors may not all be in yet: "near" is 85% of the weights.
    assert 0.85 * lm.estimate.weights < lm.measured < lm.estimate.total, (
        lm.estimate,
        lm.measured,
    )

    chunks = list(
        client.chat.completions.create(
            model=MLX_ID,
            messages=messages,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0

    r = client.chat.completions.create(
        model=MLX_ID, messages=messages, max_tokens=12, temperature=0, stop=[" of"]
    )
    assert r.choices[0].message.content == text[: text.index(" of")]
    assert r.choices[0].finish_reason == "stop"

    schema = {
        "type": "object",
        "properties": {"capital": {"type": "string", "maxLength": 20}},
        "required": ["capital"],
    }
    r = client.chat.completions.create(
        model=MLX_ID,
        messages=messages,
        max_tokens=40,
        temperature=0,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": schema},
        },
    )
    assert isinstance(json.loads(r.choices[0].message.content or "")["capital"], str)


def test_a_forced_tool_call_on_an_mlx_model_matches_its_schema(
    mlx_server: tuple[ServerThread, Runtime],
) -> None:
    # The tool grammar goes through llguidance on MLX, as response_format does.
    import jsonschema
    import openai

    srv, _ = mlx_server
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}},
        "required": ["city"],
    }
    tool: Any = {"type": "function", "function": {"name": "get_weather", "parameters": schema}}
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=300)
    r = client.chat.completions.create(
        model=MLX_ID,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[tool],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=60,
        temperature=0,
    )
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.tool_calls
    call = c.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), schema)


def test_admin_and_ollama_see_the_mlx_model(mlx_server: tuple[ServerThread, Runtime]) -> None:
    import ollama

    srv, _ = mlx_server
    admin = {m["id"]: m for m in httpx.get(srv.url + "/admin/models", timeout=30).json()["models"]}
    m = admin[MLX_ID]
    assert (m["format"], m["quantization"], m["architecture"]) == ("mlx", "4bit", "llama")
    assert m["memory_estimate"]["weights"] > 100_000_000
    client = ollama.Client(host=srv.url, timeout=300)
    r = client.chat(
        model=MLX_ID,
        messages=[{"role": "user", "content": "Say hello."}],
        options={"temperature": 0, "num_predict": 6},
    )
    assert r.message.content and r.eval_count is not None and 0 < r.eval_count <= 6
    # A model that is a folder has a digest and details in Ollama's listings too.
    tags = {t.model: t for t in client.list().models}
    tag = tags[f"{MLX_ID}:latest"]
    assert tag.digest and len(tag.digest) == 64
    assert tag.details is not None and tag.details.format == "mlx"
    assert f"{MLX_ID}:latest" in {p.model for p in client.ps().models}


def test_bad_input_to_an_mlx_model_is_a_clear_4xx(
    mlx_server: tuple[ServerThread, Runtime],
) -> None:
    srv, _ = mlx_server
    body = {
        "model": MLX_ID,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2,
        "logit_bias": {"999999999": 5},
    }
    r = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "logit_bias"
