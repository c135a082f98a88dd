"""Rerank in the Jina/Cohere shape (POST /v1/rerank, /rerank), on a cold server, with the bundled
instruct model judging each pair; the score checked against llama.cpp's own logits."""

from __future__ import annotations

import math
from pathlib import Path

import httpx
import pytest

from server.engines.rerank import answer_tokens, judge_messages
from server.runner import ServerThread
from server.runtime import Runtime
from tests.conftest import make_config

QUERY = "What is the capital of France?"
DOCS = [
    "Paris is the capital and largest city of France.",
    "Bananas are a yellow fruit rich in potassium.",
    "Berlin is the capital of Germany.",
    "The Eiffel Tower is in Paris.",
    "A short one.",
]


@pytest.fixture(scope="module")
def cold(tmp_path_factory: pytest.TempPathFactory, gemma_path: Path) -> ServerThread:
    """A server of its own with SmolLM2 (the default) and Gemma 3, nothing loaded."""
    folder = tmp_path_factory.mktemp("rerank-models")
    (folder / "gemma-3-270m.gguf").symlink_to(gemma_path.resolve())
    with ServerThread(Runtime(make_config(model_dirs=[folder], parallel=1, ctx=2048))) as srv:
        yield srv  # type: ignore[misc]


def rerank(srv: ServerThread, path: str = "/v1/rerank", **body: object) -> httpx.Response:
    return httpx.post(srv.url + path, json=body, timeout=300)


def scores(srv: ServerThread, model: str, docs: list[str]) -> list[float]:
    r = rerank(srv, model=model, query=QUERY, documents=docs)
    assert r.status_code == 200, r.text
    out = [0.0] * len(docs)
    for item in r.json()["results"]:
        out[item["index"]] = item["relevance_score"]
    return out


def test_rerank_on_a_cold_model_answers_sorted_results_with_usage(cold: ServerThread) -> None:
    r = rerank(cold, query=QUERY, documents=DOCS, top_n=3, return_documents=True)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "smollm2-135m-instruct.q4_1"
    results = body["results"]
    assert len(results) == 3
    got = [x["relevance_score"] for x in results]
    assert got == sorted(got, reverse=True) and all(0 < s < 1 for s in got)
    assert all(x["document"] == {"text": DOCS[x["index"]]} for x in results)
    assert body["usage"]["prompt_tokens"] > 5 * 20 and body["usage"]["total_tokens"] > 0
    # The other names and `{"text": ...}` documents: the same ranking, all of it.
    r = rerank(cold, "/rerank", query=QUERY, documents=[{"text": d} for d in DOCS])
    assert r.status_code == 200, r.text
    whole = r.json()["results"]
    assert [x["index"] for x in whole[:3]] == [x["index"] for x in results]
    assert sorted(x["index"] for x in whole) == list(range(len(DOCS)))
    assert all("document" not in x for x in whole)


@pytest.mark.parametrize("model", ["smollm2-135m-instruct.q4_1", "gemma-3-270m"])
def test_a_documents_score_is_the_same_alone_batched_and_in_any_order(
    cold: ServerThread, model: str
) -> None:
    together = scores(cold, model, DOCS)
    backwards = scores(cold, model, DOCS[::-1])[::-1]
    alone = [scores(cold, model, [d])[0] for d in DOCS]
    assert together == backwards == alone
    assert len(set(together)) == len(DOCS)  # the documents are told apart


def test_the_score_is_the_judges_yes_against_no_from_llama_cpps_own_logits(
    cold: ServerThread, smollm2_path: Path
) -> None:
    """P(yes) / (P(yes) + P(no)) for the first reply token of the judge prompt, computed
    here with llama-cpp-python's own Llama on the prompt the server renders."""
    import llama_cpp

    doc = DOCS[0]
    r = httpx.post(
        cold.url + "/apply-template",
        json={"messages": judge_messages(QUERY, doc, None)},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    llm = llama_cpp.Llama(str(smollm2_path), n_ctx=512, n_threads=2, logits_all=True, verbose=False)
    try:
        prompt = llm.tokenize(r.json()["prompt"].encode(), add_bos=False, special=True)
        llm.eval(prompt)
        logits = llm.scores[llm.n_tokens - 1]
        yes, no = answer_tokens(lambda w: llm.tokenize(w.encode(), add_bos=False, special=False))
    finally:
        llm.close()
    lse = lambda ids: math.log(sum(math.exp(float(logits[t])) for t in ids))  # noqa: E731
    expected = 1 / (1 + math.exp(lse(no) - lse(yes)))
    [got] = scores(cold, "smollm2-135m-instruct.q4_1", [doc])
    assert got == pytest.approx(expected, abs=0.005)  # other kernels: rounding only


def test_bad_rerank_requests_get_openai_errors_and_the_server_goes_on(cold: ServerThread) -> None:
    def error(status: int, **body: object) -> dict[str, object]:
        r = rerank(cold, **body)
        assert r.status_code == status, r.text
        return dict(r.json()["error"])

    assert error(400, query="", documents=["a"])["param"] == "query"
    assert error(400, query="q", documents=[])["param"] == "documents"
    assert error(400, query="q", documents=["a"] * 1001)["param"] == "documents"
    assert error(400, query="q", documents=[3])["param"] == "documents[0]"
    assert error(400, query="q", documents=["a"], top_n=0)["param"] == "top_n"
    assert error(404, query="q", documents=["a"], model="nosuch")["code"] == "model_not_found"
    long = error(400, query="q", documents=["a", "word " * 3000])
    assert long["code"] == "context_length_exceeded" and long["param"] == "documents"
    assert "2048 tokens" in str(long["message"]) and "documents[1]" in str(long["message"])
    assert rerank(cold, query="q", documents=["a"]).status_code == 200
