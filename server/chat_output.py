"""What a chat model's generated text becomes: content, reasoning and tool calls.

The engine streams text. `ChatOutputParser` splits reasoning out first (thinking may mention a
tool-call marker without making a call), then hands the rest to a tool-call parser. Each API
adapter turns the events into its own dialect's deltas; `ChatOutput` is the same result
gathered for non-streaming responses.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class ContentDelta:
    """Answer text."""

    text: str


@dataclass(frozen=True)
class ReasoningDelta:
    """Thinking text (`reasoning_content` on /v1, `thinking` on /api and /v1/messages)."""

    text: str


@dataclass(frozen=True)
class ToolCallStart:
    """A call began: its index in this reply, a fresh id and the function's name."""

    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ToolCallDelta:
    """A fragment of a call's arguments; a call's fragments concatenate to its JSON text."""

    index: int
    arguments: str


@dataclass(frozen=True)
class ToolCallEnd:
    """A call ended. `arguments` is all its fragments joined; `complete` is False when the
    text stopped (or broke) before the call closed, and then `raw` is the model's text."""

    index: int
    id: str
    name: str
    arguments: str
    complete: bool = True
    raw: str = ""


OutputEvent = ContentDelta | ReasoningDelta | ToolCallStart | ToolCallDelta | ToolCallEnd


class TextParser(Protocol):
    """A streaming parser: text in (any chunking), events out, nothing lost at `finish`."""

    def feed(self, text: str) -> list[OutputEvent]: ...

    def finish(self) -> list[OutputEvent]: ...


@dataclass(frozen=True)
class ToolCall:
    """A finished call, as a non-streaming response reports it."""

    id: str
    name: str
    arguments: str  # JSON text of an object


@dataclass
class ChatOutput:
    """A whole reply: answer, thinking and the calls it made."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)


def collect_output(events: Iterable[OutputEvent]) -> ChatOutput:
    """Gather events into one reply; a call that never closed is given back as content."""
    content: list[str] = []
    reasoning: list[str] = []
    calls: list[ToolCall] = []
    for ev in events:
        if isinstance(ev, ContentDelta):
            content.append(ev.text)
        elif isinstance(ev, ReasoningDelta):
            reasoning.append(ev.text)
        elif isinstance(ev, ToolCallEnd):
            if ev.complete:
                calls.append(ToolCall(ev.id, ev.name, ev.arguments))
            else:
                content.append(ev.raw)
    return ChatOutput("".join(content), "".join(reasoning), calls)


def merge_text(events: list[OutputEvent]) -> list[OutputEvent]:
    """Join neighbouring content (and reasoning) deltas: fewer, larger stream chunks."""
    out: list[OutputEvent] = []
    for ev in events:
        if isinstance(ev, (ContentDelta, ReasoningDelta)):
            if not ev.text:
                continue
            last = out[-1] if out else None
            if isinstance(last, ContentDelta) and isinstance(ev, ContentDelta):
                out[-1] = ContentDelta(last.text + ev.text)
                continue
            if isinstance(last, ReasoningDelta) and isinstance(ev, ReasoningDelta):
                out[-1] = ReasoningDelta(last.text + ev.text)
                continue
        out.append(ev)
    return out


class ChatOutputParser:
    """Reasoning split, then tool calls, over a reply streamed in chunks of any size."""

    def __init__(
        self, *, reasoning: TextParser | None = None, tools: TextParser | None = None
    ) -> None:
        self.reasoning = reasoning
        self.tools = tools

    def _to_tools(self, events: list[OutputEvent]) -> list[OutputEvent]:
        if self.tools is None:
            return events
        out: list[OutputEvent] = []
        for ev in events:
            if isinstance(ev, ContentDelta):
                out += self.tools.feed(ev.text)
            else:
                out.append(ev)
        return out

    def feed(self, text: str) -> list[OutputEvent]:
        """Events that `text` completes (partial markers are held back until they resolve)."""
        first: list[OutputEvent] = (
            self.reasoning.feed(text) if self.reasoning else [ContentDelta(text)]
        )
        return merge_text(self._to_tools(first))

    def finish(self) -> list[OutputEvent]:
        """Everything still held back, at the end of the reply."""
        out = self._to_tools(self.reasoning.finish()) if self.reasoning else []
        if self.tools is not None:
            out += self.tools.finish()
        return merge_text(out)

    def parse(self, text: str) -> ChatOutput:
        """A whole (non-streamed) reply."""
        return collect_output(self.feed(text) + self.finish())
