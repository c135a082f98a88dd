"""Chat with any model through the same engine, batch and cache as HTTP clients."""

from __future__ import annotations

import asyncio
import time
from typing import ClassVar

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Input, Select, Static

from server.engines.base import Finished, GenerationRequest, SamplingParams, stream
from server.errors import LmxError
from server.registry import Registry


class ChatPane(Vertical):
    """Model picker, system prompt, temperature, the conversation, and the prompt line."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "stop", "Stop", id="chat.stop", tooltip="Stop the reply"),
        Binding(
            "ctrl+l", "clear", "Clear", id="chat.clear", tooltip="Forget this model's conversation"
        ),
    ]

    def __init__(self, registry: Registry, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.registry = registry
        self.conversations: dict[str, list[dict[str, str]]] = {}
        self.busy = False

    def compose(self) -> ComposeResult:
        with Horizontal(id="chat-settings"):
            yield Select([], prompt="model", id="chat-model", allow_blank=True)
            yield Input(placeholder="system prompt", id="chat-system")
            yield Input(
                value="0.7", placeholder="temp", id="chat-temp", restrict=r"[0-9.]*", max_length=4
            )
        yield VerticalScroll(id="chat-log")
        yield Static("", id="chat-status")
        yield Input(placeholder="message (enter sends, esc stops)", id="chat-input")

    def set_models(self, ids: list[str]) -> None:
        select = self.query_one("#chat-model", Select)
        current = select.value
        select.set_options([(i, i) for i in ids])
        if current in ids:
            select.value = current
        elif ids:
            select.value = ids[0]

    @property
    def model(self) -> str | None:
        v = self.query_one("#chat-model", Select).value
        return v if isinstance(v, str) else None

    def on_select_changed(self, event: Select.Changed) -> None:
        self._redraw()

    def _redraw(self) -> None:
        log = self.query_one("#chat-log", VerticalScroll)
        log.remove_children()
        for m in self.conversations.get(self.model or "", []):
            log.mount(self._bubble(m["role"], m["content"]))
        log.scroll_end(animate=False)

    @staticmethod
    def _bubble(role: str, text: str) -> Static:
        w = Static(text, classes=f"bubble {role}", markup=False)
        w.border_title = role
        return w

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id != "chat-input":
            return
        text = event.value.strip()
        if not text or self.busy:
            return
        if self.model is None:
            self.query_one("#chat-status", Static).update("choose a model first")
            return
        event.input.value = ""
        self.reply(self.model, text)

    @work(exclusive=True, group="chat")
    async def reply(self, model: str, text: str) -> None:
        status = self.query_one("#chat-status", Static)
        log = self.query_one("#chat-log", VerticalScroll)
        convo = self.conversations.setdefault(model, [])
        convo.append({"role": "user", "content": text})
        await log.mount(self._bubble("user", text))
        answer = self._bubble("assistant", "…")
        await log.mount(answer)
        log.scroll_end(animate=False)
        self.busy = True
        parts: list[str] = []
        try:
            status.update(f"loading {model}…")
            lm = await asyncio.to_thread(self.registry.ensure_loaded, model)
            system = self.query_one("#chat-system", Input).value.strip()
            try:
                temp = min(2.0, max(0.0, float(self.query_one("#chat-temp", Input).value)))
            except ValueError:
                temp = 0.7
            msgs = ([{"role": "system", "content": system}] if system else []) + convo
            engine = lm.engine
            prompt = await asyncio.to_thread(engine.format_chat, msgs)
            room = engine.context_length - len(prompt)
            if room <= 0:
                raise LmxError(
                    f"the conversation has {len(prompt)} tokens; the context holds "
                    f"{engine.context_length} (ctrl+l clears it)"
                )
            req = GenerationRequest(
                prompt, min(1024, room), SamplingParams(temperature=temp), label="tui"
            )
            t0 = time.perf_counter()
            n = 0
            status.update("thinking…")
            async for _, ev in stream(engine, [req]):
                if isinstance(ev, Finished):
                    n = ev.completion_tokens
                    secs = time.perf_counter() - t0
                    status.update(
                        f"{model} · {n} tokens · {n / secs:.1f} tok/s · "
                        f"{ev.reason} · {ev.cached_tokens} cached"
                    )
                    break
                parts.append(ev.text)
                n += 1
                answer.update("".join(parts))
                log.scroll_end(animate=False)
                status.update(f"{model} · {n / (time.perf_counter() - t0):.1f} tok/s · esc stops")
        except LmxError as e:
            status.update(f"error: {e.message}")
        except asyncio.CancelledError:
            status.update("stopped")
            raise
        finally:
            self.busy = False
            reply = "".join(parts)
            answer.update(reply or "(no reply)")
            if reply:
                convo.append({"role": "assistant", "content": reply})
            else:
                convo.pop()

    def action_stop(self) -> None:
        self.workers.cancel_group(self, "chat")

    def action_clear(self) -> None:
        if self.model:
            self.conversations.pop(self.model, None)
        self._redraw()
