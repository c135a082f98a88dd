"""A bounded schema fuzz (schemathesis) of every documented route, against a real server with
the real model: whatever the OpenAPI document allows, lmx answers without a 5xx.

Generated requests name real model ids (the document's `model` fields are narrowed to them
here, in the test), so they reach the pipeline and the engine rather than stopping at a 404.
They run under a key capped at a few tokens per request, so a fuzzed max_tokens is either
quick or a 429, never minutes of decoding.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from server.runner import ServerThread
from server.runtime import Runtime
from tests.conftest import make_config

MODEL = "smollm2-135m-instruct.q4_1"
KEY = "sk-fuzz-0000"
EXAMPLES = 15  # per operation: about two minutes for the whole document on 2 cores
# Routes that talk to the Hugging Face hub (unreachable here), stream forever, or delete files.
SKIP = ("/admin/hub", "/admin/downloads", "/api/pull", "/admin/events", "/api/delete")
SKIP_OPS = {("DELETE", "/admin/models/{model_id}")}


@pytest.fixture(scope="module")
def fuzzed() -> Iterator[ServerThread]:
    rt = Runtime(make_config(api_key=KEY, key_max_tokens=8, parallel=2, load_timeout=5))
    with ServerThread(rt) as srv:
        yield srv
    rt.close()


def narrow_models(node: Any) -> None:
    """Every string property called `model` (or a `model_id` path parameter) takes real ids."""
    if isinstance(node, dict):
        props = node.get("properties")
        if isinstance(props, dict) and isinstance(props.get("model"), dict):
            props["model"] = {"type": "string", "enum": [MODEL, "default", "smollm2"]}
        if isinstance(props, dict) and isinstance(props.get("documents"), dict):
            props["documents"]["maxItems"] = 4  # reranking 1000 documents takes minutes here
        if node.get("in") in ("path", "query") and node.get("name") in ("model_id", "model"):
            node["schema"] = {"type": "string", "enum": [MODEL]}
        for v in node.values():
            narrow_models(v)
    elif isinstance(node, list):
        for v in node:
            narrow_models(v)


def test_no_generated_request_gets_a_5xx(fuzzed: ServerThread) -> None:
    doc = httpx.get(fuzzed.url + "/schema/openapi.json", headers={"Authorization": f"Bearer {KEY}"})
    assert doc.status_code == 200
    spec = doc.json()
    narrow_models(spec)
    schema = schemathesis.openapi.from_dict(spec)
    ops = [r.ok() for r in schema.get_all_operations()]
    ops = [
        op
        for op in ops
        if not op.path.startswith(SKIP) and (op.method.upper(), op.path) not in SKIP_OPS
    ]
    assert len(ops) >= 20, [op.label for op in ops]
    failures: list[str] = []
    seen: dict[str, set[int]] = {}
    headers = {"Authorization": f"Bearer {KEY}"}

    def fuzz(op: Any) -> None:
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,  # the same cases every run: a failure reproduces
            suppress_health_check=list(HealthCheck),
        )
        @given(case=op.as_strategy())
        def run(case: Any) -> None:
            r = case.call(base_url=fuzzed.url, headers=headers, timeout=60)
            seen.setdefault(op.label, set()).add(r.status_code)
            if r.status_code >= 500:
                failures.append(
                    f"{op.label}: {r.status_code} {r.text[:300]} for {case.body!r:.300}"
                )

        run()

    for op in ops:
        fuzz(op)
    print({k: sorted(v) for k, v in seen.items()})  # in the -s output: what each route answered
    assert not failures, "\n".join(failures[:20])
    # The fuzz reached the model: each dialect had generations answered. (Which route of a
    # dialect does is up to the derandomized cases: most generated chat messages are refused,
    # a tool result with no earlier call to answer, say, which no schema can rule out.)
    answered = {k for k, v in seen.items() if 200 in v}
    for dialect in (
        {"POST /v1/chat/completions", "POST /v1/completions"},
        {"POST /api/chat", "POST /api/generate"},
        {"POST /v1/messages"},
        {"POST /v1/responses"},
    ):
        assert dialect & answered, (dialect, seen)
