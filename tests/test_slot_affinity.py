"""Slot affinity: a request that names its conversation (Claude Code's x-claude-code-agent-id,
a client's prompt_cache_key) keeps its own slot, so a subagent sharing its parent's system
prompt does not take over the parent's cached conversation. On the real engine and model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from server.discovery import describe_file
from server.engines.base import EngineOptions, GenerationRequest, SamplingParams
from server.engines.llamacpp import LlamaCppEngine
from tests.engine_runs import run

SYSTEM = "You are a careful coding agent. " * 20
PARENT = SYSTEM + "The user asked: list every file in the repository and explain each one."
CHILD = SYSTEM + "Subtask: count the lines of the file named setup.py."


@pytest.fixture
def engine(smollm2_path: Path) -> Iterator[LlamaCppEngine]:
    # No prefix store: what a slot loses is lost.
    eng = LlamaCppEngine(
        describe_file("smollm2", smollm2_path, "test"),
        EngineOptions(n_ctx=1024, parallel=2, threads=2),
    )
    eng.load()
    yield eng
    eng.close()


def turn(engine: LlamaCppEngine, text: str, affinity: str | None = None) -> int:
    """One greedy 4-token reply; the prompt tokens it found cached."""
    tokens = engine.tokenize(text, add_special=True, special=False)
    req = GenerationRequest(tokens, 4, SamplingParams(temperature=0), affinity=affinity)
    _, done = run(engine, req)
    return done.cached_tokens


@pytest.mark.parametrize("subagent", [None, "agent-7"])
def test_a_subagent_with_its_own_id_leaves_the_parents_cache_alone(
    engine: LlamaCppEngine, subagent: str | None
) -> None:
    n_parent = len(engine.tokenize(PARENT, add_special=True, special=False))
    turn(engine, PARENT)  # the parent's turn: its slot holds PARENT
    shared = turn(engine, CHILD, subagent)
    assert shared > 100  # either way the shared system prompt is reused (copied if need be)
    again = turn(engine, PARENT)
    if subagent is None:
        # Without an id the subagent takes the slot with the longest prefix: the parent's.
        assert again < n_parent - 10
    else:
        assert again >= n_parent - 1  # all of it but the token decoded for logits
