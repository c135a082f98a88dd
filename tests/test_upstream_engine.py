"""The Engine protocol, checked on the upstream engine against a real second server (another
lmx, fixture `peer`).

These are the engine conformance checks (stream then one Finished with usage, max_tokens,
stop strings, determinism, cancellation, requests at once, stats, close) written so they can
join tests/test_engine_conformance.py: `upstream_model` is the ModelInfo `create_engine` turns
into an UpstreamEngine, and `request_for` builds a request the way the pipeline does for the
engine at hand (text for an engine that `takes_text`, tokens otherwise).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server.discovery import ModelInfo
from server.engines import Engine, create_engine
from server.engines.base import (
    EngineOptions,
    GenerationRequest,
    SamplingParams,
    TextPrompt,
    TokenText,
)
from server.errors import EngineFailure, InvalidRequest, QueueFull, UpstreamError
from server.runner import ServerThread
from server.runtime import Runtime
from server.upstreams import Upstreams
from tests.conftest import make_config, wait_for
from tests.engine_runs import TIMEOUT, Run, run

SMOL = "smollm2-135m-instruct.q4_1"
OPTIONS = EngineOptions(n_ctx=512, parallel=2, threads=2, max_queue=8)
GREEDY = {"temperature": 0.0}


@contextlib.contextmanager
def upstream_model_of(
    config_flags: dict[str, Any], path: Path | None = None
) -> Iterator[ModelInfo]:
    """SmolLM2 as the catalog lists it from the upstream these settings name."""
    ups = Upstreams(make_config(path=path, **config_flags))
    try:
        yield next(m for m in ups.models() if m.id.endswith(SMOL))
    finally:
        ups.close()


@pytest.fixture(scope="module")
def upstream_model(peer: tuple[Runtime, ServerThread]) -> Iterator[ModelInfo]:
    """The peer's SmolLM2, as the catalog lists an upstream's model."""
    with upstream_model_of({"upstream": [f"peer={peer[1].url}"]}) as info:
        yield info


@pytest.fixture(scope="module")
def engine(upstream_model: ModelInfo) -> Iterator[Engine]:
    eng = create_engine(upstream_model, OPTIONS)
    eng.load()
    yield eng
    eng.close()


def peer_engine(peer: tuple[Runtime, ServerThread]) -> Engine:
    lm = peer[0].scheduler.get(SMOL)
    assert lm is not None and lm.engine is not None
    return lm.engine


def request_for(
    engine: Engine,
    text: str,
    max_tokens: int,
    sampling: dict[str, Any] | None = None,
    *,
    chat: bool = False,
    **kw: Any,
) -> GenerationRequest:
    """A request as the pipeline makes it for `engine`."""
    given = GREEDY if sampling is None else sampling
    params = SamplingParams.merged(**given)
    messages = [{"role": "user", "content": text}] if chat else None
    if engine.takes_text:
        prompt = TextPrompt(messages=messages, prompt=None if chat else text, sampling=given)
        return GenerationRequest([], max_tokens, params, text=prompt, **kw)
    tokens = (
        engine.format_chat(messages)
        if messages
        else engine.tokenize(text, add_special=True, special=False)
    )
    return GenerationRequest(tokens, max_tokens, params, **kw)


def test_loaded_engine_is_alive_and_takes_text(engine: Engine, upstream_model: ModelInfo) -> None:
    assert engine.alive and engine.takes_text
    assert engine.info is upstream_model
    assert engine.context_length >= 0  # what the upstream states; lmx's model list does not
    with pytest.raises(InvalidRequest):
        engine.tokenize("hello")
    with pytest.raises(InvalidRequest):
        engine.format_chat([{"role": "user", "content": "hi"}])
    with pytest.raises(InvalidRequest):  # tokens alone mean nothing to another server
        engine.submit(GenerationRequest([1, 2, 3], 4), lambda ev: None)


def test_stream_is_text_then_one_finished_with_usage(
    engine: Engine, peer: tuple[Runtime, ServerThread]
) -> None:
    r = Run(engine, request_for(engine, "Once upon a time", 6, ignore_eos=True))
    fin = r.finish()
    assert r.events.empty()
    assert all(isinstance(e, TokenText) and e.text for e in r.seen[:-1])
    assert len(r.seen) >= 2
    assert fin.reason == "length"
    # The usage is the upstream's own count of its tokens.
    own = peer_engine(peer).tokenize("Once upon a time", add_special=True, special=False)
    assert (fin.prompt_tokens, fin.completion_tokens) == (len(own), 6)
    assert fin.timings is not None and fin.timings.prompt_tokens == len(own)
    assert fin.timings.total_ms >= fin.timings.ttft_ms > 0
    assert r.gen.done.is_set()


def test_max_tokens_ends_with_length(engine: Engine) -> None:
    text, fin = run(engine, request_for(engine, "Once upon a time", 3, ignore_eos=True))
    assert (fin.reason, fin.completion_tokens) == ("length", 3)
    assert text


def test_end_of_generation_ends_with_stop(engine: Engine) -> None:
    text, fin = run(engine, request_for(engine, "Say OK.", 60, chat=True))
    assert fin.reason == "stop" and 0 < fin.completion_tokens < 60
    assert "<|im_end|>" not in text


def test_temperature_zero_is_deterministic_and_the_upstream_unchanged(
    engine: Engine, peer: tuple[Runtime, ServerThread]
) -> None:
    first, _ = run(engine, request_for(engine, "Once upon a time", 8, ignore_eos=True))
    second, _ = run(engine, request_for(engine, "Once upon a time", 8, ignore_eos=True))
    assert first == second and first
    own = peer_engine(peer)
    direct, _ = run(own, request_for(own, "Once upon a time", 8, ignore_eos=True))
    assert first == direct


def test_seed_makes_sampling_reproducible(engine: Engine) -> None:
    sampling = {"temperature": 1.5, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "seed": 1234}
    req = request_for(engine, "My favourite word is", 8, sampling, ignore_eos=True)
    first, _ = run(engine, req)
    second, _ = run(engine, req)
    assert first == second and first


def test_stop_string_ends_the_text_before_it(engine: Engine) -> None:
    full, _ = run(engine, request_for(engine, "Once upon a time", 12, ignore_eos=True))
    words = full.split()
    assert len(words) >= 4, full
    stop = " " + words[3]
    cut = full.index(stop)
    req = request_for(engine, "Once upon a time", 12, stop=[stop, "never-seen"], ignore_eos=True)
    r = Run(engine, req)
    fin = r.finish()
    assert fin.reason == "stop"
    assert r.text == full[:cut]
    assert all(stop not in e.text for e in r.seen if isinstance(e, TokenText))


def test_cancel_ends_with_cancelled_here_and_upstream(
    engine: Engine, peer: tuple[Runtime, ServerThread]
) -> None:
    before = peer_engine(peer).stats()["finished"].get("cancelled", 0)
    r = Run(engine, request_for(engine, "Once upon a time", 2000, ignore_eos=True))
    assert isinstance(r.next(), TokenText)
    r.gen.cancel()
    fin = r.finish()
    assert fin.reason == "cancelled"
    assert fin.completion_tokens < 2000
    # Closing the stream is how the upstream learns: it stops generating too.
    wait_for(lambda: peer_engine(peer).stats()["finished"].get("cancelled", 0) > before, 60)


def test_cancel_before_it_starts(engine: Engine) -> None:
    r = Run(engine, request_for(engine, "Once upon a time", 2000, ignore_eos=True))
    r.gen.cancel()
    assert r.finish().reason == "cancelled"
    wait_for(lambda: engine.stats()["slots_busy"] == 0 and engine.stats()["queue_depth"] == 0)


def test_requests_at_once_all_finish_as_they_would_alone(engine: Engine) -> None:
    texts = ["Once upon a time", "The capital of France is", "1, 2, 3,"]
    reqs = [request_for(engine, t, 5, ignore_eos=True) for t in texts]
    alone = [run(engine, r)[0] for r in reqs]
    runs = [Run(engine, r) for r in reqs]  # three at once on the peer's two slots
    finished = [r.finish() for r in runs]
    assert [f.reason for f in finished] == ["length"] * 3
    assert [f.completion_tokens for f in finished] == [5] * 3
    assert [r.text for r in runs] == alone


def test_structured_output_is_enforced(engine: Engine) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}},
        "required": ["name"],
    }
    req = request_for(engine, "Give me a name as JSON.", 40, chat=True)
    assert req.text is not None
    req.text = TextPrompt(
        messages=req.text.messages, sampling=GREEDY, json_mode=True, json_schema=schema
    )
    text, fin = run(engine, req)
    assert fin.reason == "stop", text
    assert isinstance(json.loads(text)["name"], str)


def test_an_upstream_refusal_is_a_typed_error_before_any_text(engine: Engine) -> None:
    r = Run(engine, request_for(engine, "Hi", 4, logit_bias={10**9: 1.0}))
    fin = r.finish()
    assert fin.reason == "error" and r.text == ""
    assert isinstance(fin.failure, UpstreamError)
    assert fin.failure.status == 400 and fin.failure.param == "logit_bias"


def test_logit_bias_steers_the_next_token_by_the_upstreams_ids(
    engine: Engine, peer: tuple[Runtime, ServerThread]
) -> None:
    own = peer_engine(peer)
    target = own.tokenize(" banana", add_special=False)[0]
    text, _ = run(engine, request_for(engine, "Once upon a time", 1, logit_bias={target: 100.0}))
    assert text == own.detokenize([target]) != ""


def test_embeddings_come_from_the_upstream(
    engine: Engine, peer: tuple[Runtime, ServerThread]
) -> None:
    vecs, n = engine.embed(["hello world", "a cat"])
    direct, m = peer_engine(peer).embed(["hello world", "a cat"])
    assert n == m > 0
    assert len(vecs) == 2 and len(vecs[0]) == len(direct[0]) > 100
    assert all(abs(a - b) < 1e-5 for a, b in zip(vecs[0], direct[0], strict=True))


def test_rerank_comes_from_the_upstream(engine: Engine, peer: tuple[Runtime, ServerThread]) -> None:
    docs = ["Paris is the capital of France.", "Bananas are yellow."]
    scores, n = engine.rerank("What is the capital of France?", docs)
    direct, m = peer_engine(peer).rerank("What is the capital of France?", docs)
    assert n == m > 0 and scores == direct


def test_stats_report_slots_queue_and_totals(engine: Engine) -> None:
    before = engine.stats()
    run(engine, request_for(engine, "Once upon a time", 2, ignore_eos=True))
    st = engine.stats()
    assert set(st) >= {
        "slots",
        "slots_busy",
        "queue_depth",
        "requests_total",
        "tokens_generated",
        "finished",
    }
    assert st["slots"] == 64  # the upstream's `parallel` (default), not lmx's slots
    assert st["slots_busy"] == 0 and st["queue_depth"] == 0
    assert st["requests_total"] == before["requests_total"] + 1
    assert st["tokens_generated"] == before["tokens_generated"] + 2
    assert st["finished"]["length"] == before["finished"].get("length", 0) + 1


def test_queue_full_then_close_cancels_and_refuses(
    peer: tuple[Runtime, ServerThread], tmp_path: Path
) -> None:
    cfg = tmp_path / "lmx.toml"
    cfg.write_text(f'[upstreams.one]\nurl = "{peer[1].url}"\nparallel = 1\n')
    with upstream_model_of({}, cfg) as info:
        eng = create_engine(info, EngineOptions(max_queue=1))
        eng.load()
        try:
            long = request_for(eng, "Once upon a time", 2000, ignore_eos=True)
            running = Run(eng, long)
            wait_for(lambda: eng.stats()["slots_busy"] == 1, TIMEOUT)
            waiting = Run(eng, long)
            assert eng.stats()["queue_depth"] == 1
            with pytest.raises(QueueFull):
                eng.submit(long, lambda ev: None)
            assert isinstance(running.next(), TokenText)
            eng.close()
            assert running.finish().reason == "cancelled"
            assert waiting.finish().reason == "cancelled"
            assert waiting.finish().completion_tokens == 0
            with pytest.raises(EngineFailure):
                eng.submit(long, lambda ev: None)
            eng.close()  # a second close is harmless
        finally:
            eng.close()
