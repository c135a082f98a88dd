"""Thinking split out of replies, whatever the chunking."""

from __future__ import annotations

import random

import pytest

from server.chat_output import (
    ChatOutput,
    ChatOutputParser,
    ContentDelta,
    OutputEvent,
    ReasoningDelta,
    collect_output,
)
from server.reasoning import ThinkSplitter, prompt_opens_thinking, template_thinks
from server.toolcall_parsers import HermesParser


def chunkings(text: str) -> list[list[str]]:
    """The text whole, one character at a time, in every fixed size up to 12, and random."""
    out = [[text], list(text)]
    for n in range(2, 13):
        out.append([text[i : i + n] for i in range(0, len(text), n)])
    rng = random.Random(7)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, max(len(text), 2)), min(6, max(len(text) - 1, 1))))
        out.append([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)])
    return out


def split(text: str, chunks: list[str], **kw: bool) -> tuple[ChatOutput, list[OutputEvent]]:
    s = ThinkSplitter(**kw)
    events: list[OutputEvent] = []
    for c in chunks:
        events += s.feed(c)
    events += s.finish()
    return collect_output(events), events


CASES = [
    # (reply, starts_inside, reasoning, content)
    ("<think>\nLet me see: 2+2.\n</think>\n\nIt is 4.", False, "Let me see: 2+2.", "It is 4."),
    (
        "  <think>a < b, and </thin is not a tag</think>Yes",
        False,
        "a < b, and </thin is not a tag",
        "Yes",
    ),
    (
        "No thinking here, <think> later is content.",
        False,
        "",
        "No thinking here, <think> later is content.",
    ),
    ("<think>cut off by max_tokens", False, "cut off by max_tokens", ""),
    ("<think>cut in the tag </thi", False, "cut in the tag </thi", ""),
    ("I opened it in the prompt.\n</think>\nAnswer", True, "I opened it in the prompt.", "Answer"),
    ("<think>\nWrote the tag anyway</think>Answer", True, "Wrote the tag anyway", "Answer"),
    ("Still thinking when it ended", True, "Still thinking when it ended", ""),
    ("<thin", False, "", "<thin"),
    ("", False, "", ""),
    ("<think></think>Just the answer", False, "", "Just the answer"),
]


@pytest.mark.parametrize(("reply", "inside", "reasoning", "content"), CASES)
def test_split_whatever_the_chunking(
    reply: str, inside: bool, reasoning: str, content: str
) -> None:
    for chunks in chunkings(reply):
        out, events = split(reply, chunks, starts_inside=inside)
        assert (out.reasoning, out.content) == (reasoning, content), chunks
        assert all(e.text for e in events if isinstance(e, (ReasoningDelta, ContentDelta)))


def test_reasoning_streams_before_the_block_closes() -> None:
    s = ThinkSplitter()
    assert s.feed("<think>First ") == [ReasoningDelta("First")]  # trailing space held
    assert s.feed("step, ") == [ReasoningDelta(" step,")]
    assert s.feed("done.</th") == [ReasoningDelta(" done.")]
    assert s.feed("ink>\n\n") == []
    assert s.feed("Hi") == [ContentDelta("Hi")]
    assert s.finish() == []


def test_prompt_opens_thinking() -> None:
    r1 = "<\uff5cUser\uff5c>Hi<\uff5cAssistant\uff5c><think>\n"  # DeepSeek-R1's bars
    qwen3_no_think = "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert prompt_opens_thinking(r1)
    assert not prompt_opens_thinking(qwen3_no_think)
    assert not prompt_opens_thinking("<|im_start|>assistant\n")
    assert template_thinks("{% if '</think>' in content %}...<think>{% endif %}")
    assert not template_thinks("{{ messages[0].content }}") and not template_thinks(None)


def test_thinking_that_mentions_a_tool_call_is_not_a_call() -> None:
    reply = (
        '<think>I could write <tool_call>{"name": "add", "arguments": {}}</tool_call> '
        'but will not.</think>\n<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>'
    )
    for chunks in chunkings(reply):
        parser = ChatOutputParser(reasoning=ThinkSplitter(), tools=HermesParser(["add"]))
        events: list[OutputEvent] = []
        for c in chunks:
            events += parser.feed(c)
        out = collect_output(events + parser.finish())
        assert "<tool_call>" in out.reasoning and out.content == ""
        assert [(c.name, c.arguments) for c in out.tool_calls] == [("add", '{"a": 1}')]
