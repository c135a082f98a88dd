"""Driving an engine directly, as the pipeline does: submit, read every event in order."""

from __future__ import annotations

import queue

from server.engines import Engine
from server.engines.base import Event, Finished, Generation, GenerationRequest, TokenText

TIMEOUT = 300  # seconds for one request on a loaded CPU (MLX's CPU backend is slow)


class Run:
    """One submitted request and every event it produced, in order."""

    def __init__(self, engine: Engine, req: GenerationRequest) -> None:
        self.events: queue.Queue[Event] = queue.Queue()
        self.seen: list[Event] = []
        self.gen: Generation = engine.submit(req, self.events.put)

    def next(self) -> Event:
        ev = self.events.get(timeout=TIMEOUT)
        self.seen.append(ev)
        return ev

    def finish(self) -> Finished:
        while not self.seen or not isinstance(self.seen[-1], Finished):
            self.next()
        last = self.seen[-1]
        assert isinstance(last, Finished)
        return last

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.seen if isinstance(e, TokenText))


def run(engine: Engine, req: GenerationRequest) -> tuple[str, Finished]:
    """The whole text and how it finished."""
    r = Run(engine, req)
    fin = r.finish()
    return r.text, fin
