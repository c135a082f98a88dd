"""Chat with any model through the same engine, batch and cache as HTTP clients."""

from __future__ import annotations

import asyncio
import time
from typing import ClassVar

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Collapsible, Input, Select, Static

from server.errors import LmxError
from server.pipeline import Delta, Done, GenerateRequest, Reasoning, Sampling
from server.runtime import Runtime


class ChatPane(Vertical):
    """Model picker, system prompt, temperature, the conversation, and the prompt line."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "stop", "Stop", id="chat.stop", tooltip="Stop the reply"),
        Binding(
            "ctrl+l", "clear", "Clear", id="chat.clear", tooltip="Forget this model's conversation"
        ),
    ]

    def __init__(self, rt: Runtime, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.rt = rt
        self.conversations: dict[str, list[dict[str, str]]] = {}
        self.busy = False
        self._ids: list[str] = []
        self._shown: str | None = None  # the model whose conversation the log shows

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
        if ids == self._ids:
            return  # a load or unload elsewhere must not reset the picker (or the chat)
        self._ids = list(ids)
        select = self.query_one("#chat-model", Select)
        current = select.value
        select.set_options([(i, i) for i in ids])
        if current in ids:
            select.value = current
        elif ids:
            select.value = ids[0]

    def choose(self, model_id: str) -> None:
        """Show this model's conversation (a model pulled a moment ago is added)."""
        if model_id not in self._ids:
            self.set_models([*self._ids, model_id])
        self.query_one("#chat-model", Select).value = model_id

    @property
    def model(self) -> str | None:
        v = self.query_one("#chat-model", Select).value
        return v if isinstance(v, str) else None

    def on_select_changed(self, event: Select.Changed) -> None:
        if self.model != self._shown:
            self._redraw()

    def _redraw(self) -> None:
        self._shown = self.model
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
        thinking: list[str] = []  # a reasoning model's thinking, shown apart from the answer
        think: Collapsible | None = None
        think_text = Static("", classes="thinking-text", markup=False)
        run = None
        try:
            if self.rt.scheduler.get(model) is None:
                status.update(f"loading {model}…")
            system = self.query_one("#chat-system", Input).value.strip()
            try:
                temp = min(2.0, max(0.0, float(self.query_one("#chat-temp", Input).value)))
            except ValueError:
                temp = 0.7
            msgs = ([{"role": "system", "content": system}] if system else []) + convo
            # The same pipeline as API requests: a lease (keep_alive, LRU), the request log.
            run = await self.rt.service.start(
                GenerateRequest(
                    model=model,
                    messages=msgs,
                    max_tokens=1024,
                    sampling=Sampling(temperature=temp),
                    label="tui",
                    path="chat",
                )
            )
            t0 = time.perf_counter()
            n = 0
            status.update("thinking…")
            async for ev in run.events():
                if isinstance(ev, Done):
                    if ev.finished.reason == "error":
                        raise LmxError(ev.finished.error or "generation failed")
                    n = ev.finished.completion_tokens
                    secs = time.perf_counter() - t0
                    status.update(
                        f"{model} · {n} tokens · {n / secs:.1f} tok/s · "
                        f"{ev.finished.reason} · {ev.finished.cached_tokens} cached"
                    )
                    continue
                if isinstance(ev, Reasoning):
                    if think is None:
                        think = Collapsible(think_text, title="thinking", classes="thinking")
                        await log.mount(think, before=answer)
                    thinking.append(ev.text)
                    think_text.update("".join(thinking))
                    think.title = f"thinking · {len(thinking)} tokens"
                    n += 1
                    log.scroll_end(animate=False)
                    status.update(f"{model} · thinking · esc stops")
                    continue
                if not isinstance(ev, Delta):
                    continue  # (tool calls: the chat offers no tools)
                if think is not None and not parts:
                    think.collapsed = True  # the answer begins: the thinking folds away
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
            if run is not None:
                await run.aclose()  # a stopped reply frees its slot and is recorded at once
            self.busy = False
            reply = "".join(parts)
            if not reply and thinking:
                answer.update(f"(no answer: all {len(thinking)} tokens went to thinking)")
            else:
                answer.update(reply or "(no reply)")
            if reply:
                convo.append({"role": "assistant", "content": reply})
            else:
                convo.pop()

    def action_stop(self) -> None:
        self.workers.cancel_group(self, "chat")

    def action_clear(self) -> None:
        # A reply still coming would run on unseen to max_tokens: stop it first.
        self.workers.cancel_group(self, "chat")
        if self.model:
            self.conversations.pop(self.model, None)
        self._redraw()
