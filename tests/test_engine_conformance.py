"""The Engine protocol, checked the same way against every engine.

Each engine runs a real model: llama.cpp the bundled SmolLM2 GGUF, MLX the same weights
converted to an MLX directory (tests/mlx_model.py). To add an engine (the upstream one), add an
entry to MODELS: a function of the pytest request returning the ModelInfo that
`create_engine` turns into that engine (for upstream: a ModelInfo pointing at a server a
fixture started). Every test below then runs against it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from server.discovery import ModelInfo, describe_file, describe_mlx_dir
from server.engines import Engine, create_engine
from server.engines.base import (
    EngineOptions,
    GenerationRequest,
    SamplingParams,
    TokenText,
)
from server.errors import ChatTemplateBroken, EngineFailure, InvalidRequest, QueueFull
from server.grammar import json_grammar
from tests.conftest import wait_for
from tests.engine_runs import TIMEOUT, Run, run


def _llamacpp(request: pytest.FixtureRequest) -> ModelInfo:
    path: Path = request.getfixturevalue("smollm2_path")
    return describe_file("smollm2-gguf", path, "test")


def _mlx(request: pytest.FixtureRequest) -> ModelInfo:
    folder: Path = request.getfixturevalue("smollm2_mlx_dir")
    return describe_mlx_dir("smollm2-mlx", folder, "test")


MODELS: dict[str, Callable[[pytest.FixtureRequest], ModelInfo]] = {
    "llamacpp": _llamacpp,
    "mlx": _mlx,
}
OPTIONS = EngineOptions(n_ctx=512, parallel=2, threads=2, max_queue=8)
GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module", params=list(MODELS))
def model(request: pytest.FixtureRequest) -> ModelInfo:
    info = MODELS[request.param](request)
    assert info.usable, info.error
    return info


@pytest.fixture(scope="module")
def engine(model: ModelInfo) -> Iterator[Engine]:
    eng = create_engine(model, OPTIONS)
    eng.load()
    yield eng
    eng.close()


def prompt(engine: Engine, text: str = "Once upon a time") -> list[int]:
    return engine.tokenize(text, add_special=True, special=False)


def test_loaded_engine_is_alive_with_its_context(engine: Engine, model: ModelInfo) -> None:
    assert engine.alive
    assert engine.info is model
    assert engine.context_length == OPTIONS.n_ctx


def test_tokenize_detokenize_round_trip(engine: Engine) -> None:
    text = "Hello world, 12345 ünïcödé — 東京 and  two spaces\n\ttab"
    toks = engine.tokenize(text, add_special=False, special=False)
    assert len(toks) > 10
    assert engine.detokenize(toks) == text
    # Control tokens in the text are parsed as such only when asked.
    marked = "<|im_start|>user"
    assert len(engine.tokenize(marked, add_special=False, special=True)) == 2
    assert len(engine.tokenize(marked, add_special=False, special=False)) > 2


def test_render_chat_uses_the_model_template(engine: Engine) -> None:
    messages = [{"role": "user", "content": "Hi there"}]
    text = engine.render_chat(messages)
    assert "<|im_start|>user\nHi there<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")
    toks = engine.format_chat(messages)
    assert toks == engine.tokenize(text, add_special=True, special=True)
    assert engine.tokenize("<|im_start|>", add_special=False)[0] in toks


def test_render_chat_passes_tools_to_the_template(model: ModelInfo) -> None:
    template = (
        "{% for t in tools %}tool:{{ t.function.name }}\n{% endfor %}"
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    )
    eng = create_engine(model, EngineOptions(n_ctx=256, parallel=1, chat_template=template))
    eng.load()
    try:
        tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
        text = eng.render_chat([{"role": "user", "content": "Hi"}], tools=tools)
        assert text == "tool:get_weather\nuser: Hi\n"
        bad = "{{ raise_exception('no system messages') }}"
        eng2 = create_engine(model, EngineOptions(n_ctx=256, parallel=1, chat_template=bad))
        eng2.load()
        try:
            with pytest.raises(InvalidRequest, match="no system messages"):
                eng2.render_chat([{"role": "user", "content": "Hi"}])
        finally:
            eng2.close()
    finally:
        eng.close()


def test_chat_template_is_the_models_and_takes_template_kwargs(model: ModelInfo) -> None:
    template = (
        "{% if enable_thinking %}think\n{% endif %}"
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    )
    eng = create_engine(model, EngineOptions(n_ctx=256, parallel=1, chat_template=template))
    eng.load()
    try:
        assert eng.chat_template is not None and eng.chat_template.source == template
        messages = [{"role": "user", "content": "Hi"}]
        assert eng.render_chat(messages) == "user: Hi\n"
        kwargs = {"enable_thinking": True}
        assert eng.render_chat(messages, template_kwargs=kwargs) == "think\nuser: Hi\n"
        assert eng.format_chat(messages, template_kwargs=kwargs) == eng.tokenize(
            "think\nuser: Hi\n", add_special=True, special=True
        )
    finally:
        eng.close()


def test_a_template_past_its_budget_is_broken_not_a_hang(model: ModelInfo) -> None:
    looping = "{% for i in range(10**6) %}{% for j in range(10**6) %}x{% endfor %}{% endfor %}"
    eng = create_engine(model, EngineOptions(n_ctx=256, parallel=1, chat_template=looping))
    eng.load()
    try:
        with pytest.raises(ChatTemplateBroken):
            eng.render_chat([{"role": "user", "content": "Hi"}])
        assert eng.chat_template is not None and eng.chat_template.broken
    finally:
        eng.close()


def test_stream_is_text_then_one_finished_with_usage(engine: Engine) -> None:
    p = prompt(engine)
    r = Run(engine, GenerationRequest(p, 6, GREEDY, ignore_eos=True))
    fin = r.finish()
    assert r.events.empty()
    assert all(isinstance(e, TokenText) and e.text for e in r.seen[:-1])
    assert len(r.seen) >= 2
    assert fin.reason == "length"
    assert (fin.prompt_tokens, fin.completion_tokens) == (len(p), 6)
    assert fin.timings is not None and fin.timings.prompt_tokens == len(p)
    assert fin.timings.total_ms >= fin.timings.ttft_ms > 0
    assert r.gen.done.is_set()


def test_max_tokens_ends_with_length(engine: Engine) -> None:
    text, fin = run(engine, GenerationRequest(prompt(engine), 3, GREEDY, ignore_eos=True))
    assert (fin.reason, fin.completion_tokens) == ("length", 3)
    assert text


def test_end_of_generation_token_ends_with_stop(engine: Engine) -> None:
    chat = engine.format_chat([{"role": "user", "content": "Say OK."}])
    text, fin = run(engine, GenerationRequest(chat, 60, GREEDY))
    assert fin.reason == "stop" and 0 < fin.completion_tokens < 60
    assert "<|im_end|>" not in text


def test_temperature_zero_is_deterministic(engine: Engine) -> None:
    req = GenerationRequest(prompt(engine), 8, GREEDY, ignore_eos=True)
    first, _ = run(engine, req)
    second, _ = run(engine, req)
    assert first == second and first


def test_a_repeated_prompt_reuses_the_cached_prefix(engine: Engine) -> None:
    p = prompt(engine, "The history of the printing press begins in")
    req = GenerationRequest(p, 4, GREEDY, ignore_eos=True)
    first, _ = run(engine, req)
    second, f2 = run(engine, req)
    assert first == second
    assert len(p) // 2 <= f2.cached_tokens <= len(p)
    assert f2.timings is not None and f2.timings.cached_tokens == f2.cached_tokens


def test_seed_makes_sampling_reproducible(engine: Engine) -> None:
    sampling = SamplingParams(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=1234)
    req = GenerationRequest(prompt(engine, "My favourite word is"), 8, sampling, ignore_eos=True)
    first, _ = run(engine, req)
    second, _ = run(engine, req)
    assert first == second and first


def test_stop_string_ends_the_text_before_it(engine: Engine) -> None:
    p = prompt(engine)
    full, _ = run(engine, GenerationRequest(p, 12, GREEDY, ignore_eos=True))
    words = full.split()
    assert len(words) >= 4, full
    stop = " " + words[3]
    cut = full.index(stop)
    r = Run(engine, GenerationRequest(p, 12, GREEDY, stop=[stop, "never-seen"], ignore_eos=True))
    fin = r.finish()
    assert fin.reason == "stop" and fin.stop_sequence == stop
    assert r.text == full[:cut]
    assert all(stop not in e.text for e in r.seen if isinstance(e, TokenText))
    _, eos = run(engine, GenerationRequest(p, 2, GREEDY, stop=["never-seen"], ignore_eos=True))
    assert eos.stop_sequence is None


def test_cancel_ends_with_cancelled(engine: Engine) -> None:
    r = Run(engine, GenerationRequest(prompt(engine), 2000, GREEDY, ignore_eos=True))
    assert isinstance(r.next(), TokenText)
    r.gen.cancel()
    fin = r.finish()
    assert fin.reason == "cancelled"
    assert fin.completion_tokens < 2000


def test_requests_at_once_all_finish_as_they_would_alone(engine: Engine) -> None:
    texts = ["Once upon a time", "The capital of France is", "1, 2, 3,"]
    reqs = [GenerationRequest(prompt(engine, t), 5, GREEDY, ignore_eos=True) for t in texts]
    alone = [run(engine, r)[0] for r in reqs]
    runs = [Run(engine, r) for r in reqs]  # three requests on two slots: one waits
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
    chat = engine.format_chat([{"role": "user", "content": "Give me a name as JSON."}])
    text, fin = run(engine, GenerationRequest(chat, 40, GREEDY, grammar=json_grammar(schema)))
    assert fin.reason == "stop", text
    assert isinstance(json.loads(text)["name"], str)


def test_a_grammar_holds_hot_sampling_from_the_whole_vocabulary(engine: Engine) -> None:
    # The chain picks first and the grammar checks that one token (as llama.cpp's server
    # does); at temperature 2 over every token most picks are turned down and made again,
    # some with none of the most likely tokens allowed: the reply still follows the grammar.
    import re

    grammar = 'root ::= ("yes" | "no") " " [0-9] [0-9]? [0-9]?'
    chat = engine.format_chat([{"role": "user", "content": "Tell me a story."}])
    for seed in range(4):
        hot = SamplingParams(temperature=2.0, top_k=0, top_p=1.0, min_p=0.0, seed=seed)
        text, fin = run(engine, GenerationRequest(chat, 8, hot, grammar=grammar))
        assert re.fullmatch(r"(yes|no) [0-9]{1,3}", text), text
        assert fin.reason in ("stop", "length")


def test_bad_requests_are_refused_at_submit(engine: Engine) -> None:
    p = prompt(engine)
    with pytest.raises(InvalidRequest) as e:
        engine.submit(GenerationRequest(p, 4, logit_bias={10**9: 1.0}), lambda ev: None)
    assert e.value.param == "logit_bias"
    with pytest.raises(InvalidRequest) as e:
        engine.submit(GenerationRequest(p, 4, grammar="root ::= ("), lambda ev: None)
    assert e.value.param == "grammar"
    # The error names the field the grammar was made from.
    with pytest.raises(InvalidRequest) as e:
        bad = GenerationRequest(p, 4, grammar="root ::= (", grammar_param="tools")
        engine.submit(bad, lambda ev: None)
    assert e.value.param == "tools"


def test_logit_bias_steers_the_next_token(engine: Engine) -> None:
    p = prompt(engine)
    target = engine.tokenize(" banana", add_special=False)[0]
    text, _ = run(engine, GenerationRequest(p, 1, GREEDY, logit_bias={target: 100.0}))
    assert text == engine.detokenize([target]) != ""


def test_preserved_control_tokens_are_emitted_as_their_text(engine: Engine) -> None:
    # Tool-call and thinking markers that are control tokens reach the reply's parser only
    # when the request names them; other control tokens decode to nothing.
    marker = "<|im_start|>"
    (tok,) = engine.tokenize(marker, add_special=False, special=True)
    forced = GenerationRequest(prompt(engine), 2, GREEDY, logit_bias={tok: 100.0})
    text, fin = run(engine, forced)
    assert (text, fin.completion_tokens) == ("", 2)
    forced.preserved_tokens = frozenset({tok})
    text, fin = run(engine, forced)
    assert (text, fin.completion_tokens) == (marker * 2, 2)


def test_progress_counts_what_the_engine_did(engine: Engine) -> None:
    p = prompt(engine, "Progress is counted here")
    r = Run(engine, GenerationRequest(p, 3, GREEDY, ignore_eos=True))
    assert r.gen.progress.phase(len(p)) in ("queued", "prefill", "decode")
    fin = r.finish()
    prog = r.gen.progress
    assert prog.slot is not None and 0 <= prog.slot < OPTIONS.parallel
    assert prog.generated == fin.completion_tokens == 3
    assert prog.prompt_done == len(p) and prog.cached == fin.cached_tokens
    assert prog.first_token_at is not None and prog.phase(len(p)) == "decode"
    states = engine.stats()["slot_states"]
    assert len(states) == OPTIONS.parallel
    assert all(state in ("idle", "prefill", "decode") for state, _ in states)


def test_embeddings_are_unit_vectors(engine: Engine) -> None:
    vecs, n = engine.embed(["hello world", "a cat"])
    assert len(vecs) == 2 and len(vecs[0]) == len(vecs[1]) > 100
    assert n == len(prompt(engine, "hello world")) + len(prompt(engine, "a cat"))
    for v in vecs:
        assert abs(sum(x * x for x in v) - 1.0) < 1e-3
    assert vecs[0] != vecs[1]


def test_rerank_scores_each_document_the_same_alone_and_together(engine: Engine) -> None:
    docs = ["Paris is the capital of France.", "Bananas are yellow.", "Berlin is in Germany."]
    scores, n = engine.rerank("What is the capital of France?", docs)
    assert len(scores) == 3 and all(0 < s < 1 for s in scores) and len(set(scores)) == 3
    assert n > 3 * 20  # the judge prompt around each pair
    alone = [engine.rerank("What is the capital of France?", [d])[0][0] for d in docs]
    assert alone == scores
    other, _ = engine.rerank("What is the capital of France?", docs, "Find fruit facts")
    assert other != scores  # the instruction is part of the prompt


def test_stats_report_slots_queue_and_totals(engine: Engine) -> None:
    before = engine.stats()
    run(engine, GenerationRequest(prompt(engine), 2, GREEDY, ignore_eos=True))
    st = engine.stats()
    assert set(st) >= {
        "slots",
        "slots_busy",
        "queue_depth",
        "requests_total",
        "tokens_generated",
        "finished",
    }
    assert st["slots"] == OPTIONS.parallel
    assert st["slots_busy"] == 0 and st["queue_depth"] == 0
    assert st["requests_total"] == before["requests_total"] + 1
    assert st["tokens_generated"] == before["tokens_generated"] + 2
    assert st["finished"]["length"] == before["finished"].get("length", 0) + 1


def test_queue_full_then_close_cancels_and_refuses(model: ModelInfo) -> None:
    eng = create_engine(model, EngineOptions(n_ctx=256, parallel=1, threads=2, max_queue=1))
    eng.load()
    try:
        long = GenerationRequest(prompt(eng), 2000, GREEDY, ignore_eos=True)
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
