"""Server-sent events framed as OpenAI and Anthropic frame them: lines end in LF.

Litestar's `ServerSentEvent` ends every line in CRLF, which the SSE spec allows but strict
parsers (the Open Responses compliance suite's, some agent SDKs) read as no events at all.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import replace
from typing import Any

from litestar.response import Stream
from litestar.response.sse import ServerSentEventMessage

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "Connection": "keep-alive"}

# What a stream yields: a bare data line, {"event": ..., "data": ...}, or a full message
# (a comment, for keep-alives).
SSEItem = str | dict[str, Any] | ServerSentEventMessage


def encode(item: SSEItem) -> bytes:
    """One event, every line ending in LF and a blank line after it."""
    if isinstance(item, ServerSentEventMessage):
        return replace(item, sep="\n").encode()
    if isinstance(item, dict):
        return ServerSentEventMessage(**item, sep="\n").encode()
    return ServerSentEventMessage(data=item, sep="\n").encode()


async def _frames(items: AsyncIterable[SSEItem]) -> AsyncIterator[bytes]:
    async for item in items:
        yield encode(item)


class EventStream(Stream):
    """A `text/event-stream` response of `SSEItem`s."""

    def __init__(self, items: AsyncIterable[SSEItem], *, status_code: int | None = None) -> None:
        super().__init__(
            content=_frames(items),
            media_type="text/event-stream",
            headers=SSE_HEADERS,
            status_code=status_code,
        )
