"""Continuous batching, prompt caching, cancellation and isolation in the llama.cpp engine."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from server.discovery import describe_file
from server.engines.base import EngineOptions, GenerationRequest, SamplingParams, collect
from server.engines.llamacpp import LlamaCppEngine
from server.grammar import json_grammar
from server.runner import ServerThread
from server.runtime import Runtime
from tests.conftest import load, make_config, wait_for

MODEL = "smollm2-135m-instruct.q4_1"
SYSTEM = ("You are a careful assistant for a hardware store. " * 40).strip()


@pytest.fixture(scope="module")
def engine(rt: Runtime) -> Iterator[LlamaCppEngine]:
    # These tests drive the engine directly; a lease keeps keep_alive from unloading it.
    with rt.scheduler.lease(rt.catalog.resolve(MODEL)) as lease:
        yield lease.engine  # type: ignore[misc]


def chat(engine: LlamaCppEngine, *msgs: tuple[str, str]) -> list[int]:
    return engine.format_chat([{"role": r, "content": c} for r, c in msgs])


def run_together(engine: LlamaCppEngine, reqs: list[GenerationRequest]) -> list[Any]:
    out: list[Any] = [None] * len(reqs)
    barrier = threading.Barrier(len(reqs))

    def one(i: int) -> None:
        barrier.wait()
        out[i] = collect(engine, reqs[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


def test_requests_join_a_running_batch(engine: LlamaCppEngine) -> None:
    steps0 = engine.steps
    reqs = [
        GenerationRequest(
            chat(engine, ("user", f"Tell me about planet {i}.")), 32, SamplingParams(temperature=0)
        )
        for i in range(4)
    ]
    results = run_together(engine, reqs)
    assert all(fin.completion_tokens == 32 for _, fin in results)
    # Four requests of 32 tokens decoded together take far fewer steps than one after another.
    assert engine.steps - steps0 < 2 * 32 + 8


def test_shared_system_prompt_is_prefilled_once(engine: LlamaCppEngine) -> None:
    first = chat(engine, ("system", SYSTEM), ("user", "What do you sell?"))
    collect(engine, GenerationRequest(first, 4, SamplingParams(temperature=0)))
    system_len = len(chat(engine, ("system", SYSTEM)))
    reqs = [
        GenerationRequest(
            chat(engine, ("system", SYSTEM), ("user", f"Question {i}?")),
            4,
            SamplingParams(temperature=0),
        )
        for i in range(4)
    ]
    results = run_together(engine, reqs)
    for _, f in results:
        # Every slot got the system prompt from the cache, copied from another sequence.
        assert f.cached_tokens >= system_len - 8, (f.cached_tokens, system_len)
        assert f.timings and f.timings.cached_tokens == f.cached_tokens


def test_requests_arriving_together_compute_a_shared_prompt_once(
    engine: LlamaCppEngine,
) -> None:
    system = ("You answer questions about the weather in Lisbon, briefly. " * 30).strip()
    system_len = len(chat(engine, ("system", system)))
    reqs = [
        GenerationRequest(
            chat(engine, ("system", system), ("user", f"Day {i}?")),
            4,
            SamplingParams(temperature=0),
        )
        for i in range(4)
    ]
    results = sorted(f.cached_tokens for _, f in run_together(engine, reqs))
    assert results[0] < system_len  # one request computed it...
    assert all(c >= system_len - 8 for c in results[1:])  # ...the others copied its cells


def test_multi_turn_prefills_only_the_new_turn(engine: LlamaCppEngine) -> None:
    turn1 = [("user", "Name a colour.")]
    text, fin1 = collect(
        engine, GenerationRequest(chat(engine, *turn1), 16, SamplingParams(temperature=0))
    )
    turn2 = [*turn1, ("assistant", text), ("user", "And another one?")]
    prompt2 = chat(engine, *turn2)
    _, fin2 = collect(engine, GenerationRequest(prompt2, 4, SamplingParams(temperature=0)))
    assert fin2.cached_tokens >= fin1.prompt_tokens
    assert fin2.prompt_tokens - fin2.cached_tokens < 20


def test_greedy_text_is_identical_alone_and_batched_with_7_others(
    engine: LlamaCppEngine,
) -> None:
    topics = ["rivers", "owls", "bread", "trains", "glaciers", "jazz", "salt", "maps"]
    prompts = [chat(engine, ("user", f"Write a paragraph about {t}.")) for t in topics]
    alone = [
        collect(engine, GenerationRequest(p, 48, SamplingParams(temperature=0)))[0] for p in prompts
    ]
    for shift in range(2):  # different batch neighbours and slots each round
        order = prompts[shift:] + prompts[:shift]
        batched = run_together(
            engine, [GenerationRequest(p, 48, SamplingParams(temperature=0)) for p in order]
        )
        assert [t for t, _ in batched] == alone[shift:] + alone[:shift]


def test_sampling_settings_do_not_leak_between_sequences(engine: LlamaCppEngine) -> None:
    prompt = chat(engine, ("user", "Write two sentences about rivers."))
    calm = [
        GenerationRequest(prompt, 40, SamplingParams(temperature=0.7, seed=7)) for _ in range(4)
    ]
    hot = [
        GenerationRequest(
            prompt, 40, SamplingParams(temperature=2.0, top_k=0, top_p=1.0, min_p=0.0, seed=i)
        )
        for i in range(4)
    ]
    results = run_together(engine, calm + hot)
    alone, _ = collect(engine, calm[0])
    assert {text for text, _ in results[:4]} == {alone}
    assert len({text for text, _ in results[4:]}) == 4


def test_same_seed_same_text_in_one_batch(engine: LlamaCppEngine) -> None:
    prompt = chat(engine, ("user", "Invent a name for a boat."))
    reqs = [
        GenerationRequest(prompt, 24, SamplingParams(temperature=1.0, seed=99)) for _ in range(3)
    ]
    texts = {text for text, _ in run_together(engine, reqs)}
    assert len(texts) == 1


def test_grammars_are_per_sequence(engine: LlamaCppEngine) -> None:
    obj = {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    }
    arr = {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 4}
    reqs = [
        GenerationRequest(
            chat(engine, ("user", "Name a city as JSON.")),
            100,
            SamplingParams(temperature=0),
            grammar=json_grammar(obj),
        ),
        GenerationRequest(
            chat(engine, ("user", "List some numbers as JSON.")),
            100,
            SamplingParams(temperature=0),
            grammar=json_grammar(arr),
        ),
        GenerationRequest(chat(engine, ("user", "Say hi.")), 20, SamplingParams(temperature=0)),
    ]
    (t1, f1), (t2, f2), (t3, _) = run_together(engine, reqs)
    assert f1.reason == "stop" and f2.reason == "stop"
    jsonschema.validate(json.loads(t1), obj)
    jsonschema.validate(json.loads(t2), arr)
    assert not t3.lstrip().startswith(("{", "["))


def test_long_prompt_prefill_does_not_stall_running_streams(engine: LlamaCppEngine) -> None:
    runner = GenerationRequest(
        chat(engine, ("user", "Count slowly to one hundred.")),
        300,
        SamplingParams(temperature=0),
        ignore_eos=True,
    )
    arrivals: list[float] = []
    done = threading.Event()

    def sink(ev: Any) -> None:
        arrivals.append(time.perf_counter())
        if not hasattr(ev, "text"):
            done.set()

    engine.submit(runner, sink)
    wait_for(lambda: len(arrivals) >= 5)
    long_prompt = chat(engine, ("user", "Summarise: " + "the quick brown fox " * 450))
    assert len(long_prompt) > 3 * 512  # needs several prefill chunks
    before = len(arrivals)
    _, fin = collect(engine, GenerationRequest(long_prompt, 2, SamplingParams(temperature=0)))
    # The running stream kept producing while the long prompt was prefilled chunk by chunk.
    assert fin.reason == "length"
    assert len(arrivals) - before >= 3
    assert done.wait(60)


# ----- over HTTP: disconnects and the bounded queue ---------------------------------------------


@pytest.fixture(scope="module")
def tight_server() -> Iterator[tuple[ServerThread, Runtime]]:
    rt = Runtime(make_config(parallel=1, max_queue=1))
    with ServerThread(rt) as srv:
        yield srv, rt
    rt.close()


def _long_body(tokens: int = 1500) -> dict[str, Any]:
    return {
        "model": MODEL,
        "stream": True,
        "max_tokens": tokens,
        "ignore_eos": True,
        "messages": [{"role": "user", "content": "Write an extremely long story."}],
    }


def test_client_disconnect_frees_the_slot(tight_server: tuple[ServerThread, Runtime]) -> None:
    srv, rt = tight_server
    engine = load(rt, MODEL).engine
    assert engine is not None
    st0 = engine.stats()
    with httpx.stream("POST", srv.url + "/v1/chat/completions", json=_long_body(), timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 10:
                break
    wait_for(
        lambda: engine.stats()["finished"].get("cancelled", 0) > st0["finished"].get("cancelled", 0)
    )
    st = engine.stats()
    assert st["slots_busy"] == 0 and st["queue_depth"] == 0  # nothing left to decode for it
    assert st["tokens_generated"] - st0["tokens_generated"] < 1500  # it stopped early
    # The pipeline recorded the request as abandoned by its client.
    wait_for(lambda: any(r.status == 499 for r in rt.requests.recent()))


def test_full_queue_is_429_with_retry_after(tight_server: tuple[ServerThread, Runtime]) -> None:
    srv, rt = tight_server
    engine = load(rt, MODEL).engine
    assert engine is not None
    with (
        httpx.Client(timeout=60) as c,
        c.stream("POST", srv.url + "/v1/chat/completions", json=_long_body()) as first,
    ):
        lines = first.iter_lines()
        while engine.stats()["slots_busy"] < 1:  # it holds the only slot
            next(lines)
        waiting = threading.Thread(
            target=lambda: httpx.post(
                srv.url + "/v1/chat/completions",
                json={**_long_body(4), "stream": False},
                timeout=60,
            )
        )
        waiting.start()
        wait_for(lambda: engine.stats()["queue_depth"] >= 1)
        r = httpx.post(srv.url + "/v1/chat/completions", json={**_long_body(4), "stream": False})
        assert r.status_code == 429
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "queue_full"
    waiting.join(60)
    ok = httpx.post(
        srv.url + "/v1/chat/completions", json={**_long_body(4), "stream": False}, timeout=60
    )
    assert ok.status_code == 200


def test_a_character_cut_by_the_limit_is_not_sent_as_garbage(engine: LlamaCppEngine) -> None:
    prompt = chat(engine, ("user", "Reply with only emoji: 🌍🌟🎉🚀🌈"))
    for n in range(1, 12):
        text, fin = collect(engine, GenerationRequest(prompt, n, SamplingParams(temperature=0)))
        assert "\ufffd" not in text, (n, text)
        assert fin.completion_tokens <= n


def test_greedy_text_is_identical_alone_and_batched_beyond_256_tokens(
    engine: LlamaCppEngine,
) -> None:
    # Past 256 cached tokens ggml splits a lone row's attention over the threads; the engine
    # keeps such a row from sitting alone in its ubatch, so alone and batched still agree.
    context = ("Notes from the field. " + "The river rose slowly over the stones. " * 45).strip()
    topics = ["rivers", "owls", "bread", "trains"]
    prompts = [chat(engine, ("system", context), ("user", f"Describe {t}.")) for t in topics]
    assert all(len(p) > 300 for p in prompts)
    alone = [
        collect(engine, GenerationRequest(p, 40, SamplingParams(temperature=0)))[0] for p in prompts
    ]
    batched = run_together(
        engine, [GenerationRequest(p, 40, SamplingParams(temperature=0)) for p in prompts]
    )
    assert [t for t, _ in batched] == alone


def test_without_batch_invariance_long_prompts_prefill_in_big_ubatches(
    smollm2_path: Path,
) -> None:
    # batch_invariant=False: llama-server's 512-row ubatch; everything else works the same.
    info = describe_file(MODEL, smollm2_path, "test")
    engine = LlamaCppEngine(info, EngineOptions(n_ctx=2048, parallel=2, threads=2))
    engine.options.batch_invariant = False
    engine.load()
    try:
        prompt = chat(engine, ("user", "Summarise: " + "the quick brown fox " * 200))
        assert len(prompt) > 512
        first = run_together(
            engine, [GenerationRequest(prompt, 8, SamplingParams(temperature=0))] * 2
        )
        assert all(fin.completion_tokens == 8 for _, fin in first)
        again, fin = collect(engine, GenerationRequest(prompt, 8, SamplingParams(temperature=0)))
        assert fin.cached_tokens == len(prompt) - 1 and again
    finally:
        engine.close()
