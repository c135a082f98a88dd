"""Thinking split out of a reply: `<think>…</think>` (DeepSeek-R1 distills, Qwen3, QwQ...).

Only a block at the very start of the reply counts (a model explaining HTML may write the tag
later). A template can open the block in the generation prompt (R1 distills end the prompt
with `<think>\\n`): the reply then starts inside it. A reply that ends while still thinking
(max_tokens) gives all its text as reasoning. Whitespace around the thinking is trimmed, as
llama.cpp does; no other text is ever dropped.
"""

from __future__ import annotations

from server.chat_output import ContentDelta, OutputEvent, ReasoningDelta

THINK_START = "<think>"
THINK_END = "</think>"


def partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper start of `marker`."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def prompt_opens_thinking(prompt: str, start: str = THINK_START, end: str = THINK_END) -> bool:
    """Whether the rendered prompt leaves a thinking block open for the reply."""
    tail = prompt.rstrip()
    return tail.endswith(start) and tail.rfind(end) < tail.rfind(start)


def template_thinks(template_source: str | None, start: str = THINK_START) -> bool:
    """Whether a chat template knows thinking blocks (it writes or strips the tag)."""
    return bool(template_source) and start in (template_source or "")


class ThinkSplitter:
    """Streaming splitter: text in, `ReasoningDelta` / `ContentDelta` out."""

    _BEFORE, _THINKING, _AFTER, _CONTENT = range(4)

    def __init__(
        self, *, start: str = THINK_START, end: str = THINK_END, starts_inside: bool = False
    ) -> None:
        self.start = start
        self.end = end
        self._state = self._THINKING if starts_inside else self._BEFORE
        # Inside from the prompt: the model may still write the opening tag itself.
        self._may_reopen = starts_inside
        self._buf = ""
        self._reasoning_started = False
        self._held_space = ""  # reasoning's trailing whitespace, kept until more text comes

    def feed(self, text: str) -> list[OutputEvent]:
        """Events for `text`; a partial tag at the end is held back."""
        self._buf += text
        out: list[OutputEvent] = []
        while self._buf:
            if self._state == self._BEFORE:
                head = self._buf.lstrip()
                if head.startswith(self.start):
                    self._buf = head[len(self.start) :]
                    self._state = self._THINKING
                elif not head or self.start.startswith(head):
                    break  # whitespace or a partial tag: undecided
                else:
                    self._state = self._CONTENT
            elif self._state == self._THINKING:
                if self._may_reopen:
                    head = self._buf.lstrip()
                    if head.startswith(self.start):
                        self._buf = head[len(self.start) :]
                    elif not head or self.start.startswith(head):
                        break
                    self._may_reopen = False
                    continue
                i = self._buf.find(self.end)
                if i < 0:
                    keep = partial_suffix(self._buf, self.end)
                    self._reason(self._buf[: len(self._buf) - keep], out, final=False)
                    self._buf = self._buf[len(self._buf) - keep :]
                    break
                self._reason(self._buf[:i], out, final=True)
                self._buf = self._buf[i + len(self.end) :]
                self._state = self._AFTER
            elif self._state == self._AFTER:
                self._buf = self._buf.lstrip()
                if self._buf:
                    self._state = self._CONTENT
            else:
                out.append(ContentDelta(self._buf))
                self._buf = ""
        return out

    def _reason(self, text: str, out: list[OutputEvent], *, final: bool) -> None:
        if not self._reasoning_started:
            text = text.lstrip()
            if not text:
                return
            self._reasoning_started = True
        text = self._held_space + text
        body = text.rstrip()
        self._held_space = "" if final else text[len(body) :]
        if body:
            out.append(ReasoningDelta(body))

    def finish(self) -> list[OutputEvent]:
        """The text still held back: content before any tag, reasoning inside one."""
        buf, self._buf = self._buf, ""
        if self._state == self._BEFORE:
            return [ContentDelta(buf)] if buf else []
        if self._state == self._THINKING:
            out: list[OutputEvent] = []
            self._reason(buf, out, final=True)
            return out
        return [ContentDelta(buf)] if buf else []
