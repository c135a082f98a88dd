"""The Textual app, driven by Pilot against the real rt, model and embedded server."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from textual.css.query import NoMatches
from textual.widgets import DataTable, Input, RichLog, Static, TabbedContent

from lmx_tui.app import LmxApp, start_server
from lmx_tui.widgets.gauges import GaugesPane
from lmx_tui.widgets.hub import PulledPrompt
from lmx_tui.widgets.load_prompt import LoadPrompt
from lmx_tui.widgets.requests import RequestDetailScreen, RequestsPane
from server.runner import ServerThread
from server.runtime import Runtime
from server.telemetry import GpuSnapshot, SystemSnapshot
from tests.conftest import HUB_REPO, BackgroundStream, load, make_config, wait_for

MODEL = "smollm2-135m-instruct.q4_1"


def frozen_system(gpus: tuple[GpuSnapshot, ...] = ()) -> Callable[[], SystemSnapshot]:
    snap = SystemSnapshot(
        at=0.0,
        cpu_percent=37.5,
        ram_used=6_000_000_000,
        ram_total=24_000_000_000,
        process_rss=350_000_000,
        gpus=gpus,
        gpu_note="" if gpus else "no NVIDIA GPU (driver not loaded)",
    )
    return lambda: snap


@pytest.fixture
def rt() -> Iterator[Runtime]:
    runtime = Runtime(make_config())
    yield runtime
    runtime.close()


async def until(
    pilot: object,
    cond: Callable[[], bool],
    timeout: float = 60,
    what: Callable[[], str] = lambda: "",
) -> None:
    deadline = time.monotonic() + timeout

    def holds() -> bool:
        try:
            return cond()
        except NoMatches:  # the widget is not mounted yet
            return False

    while not holds():
        assert time.monotonic() < deadline, f"condition not met in time {what()}"
        await pilot.pause(0.05)  # type: ignore[attr-defined]


def table_rows(app: LmxApp, selector: str) -> list[list[str]]:
    t = app.query_one(selector, DataTable)
    return [[str(c) for c in t.get_row_at(i)] for i in range(t.row_count)]


async def test_browser_lists_and_loads_the_model(rt: Runtime) -> None:
    app = LmxApp(rt, system_sampler=frozen_system())
    async with app.run_test(size=(100, 30)) as pilot:
        rows = table_rows(app, "#model-table")
        est = rt.scheduler.estimate_for(rt.catalog.resolve(MODEL)).total
        assert rows == [
            [
                MODEL,
                "available",
                f"{est / 1e6:.1f} MB",
                "yes",
                "llama",
                "135M",
                "Q4_1",
                "98.4 MB",
                "8192",
            ]
        ]
        await pilot.press("l")
        await until(pilot, lambda: rt.scheduler.get(MODEL) is not None)
        await until(pilot, lambda: table_rows(app, "#model-table")[0][1] == "ready")
        await pilot.press("enter")  # details
        await pilot.pause(0.1)
        text = str(app.screen.query_one("#details-text", Static).render())
        assert "general.architecture = llama" in text and "<|im_start|>" in text
        await pilot.press("escape")
        await pilot.press("u")
        await until(pilot, lambda: rt.scheduler.get(MODEL) is None)
        await until(pilot, lambda: table_rows(app, "#model-table")[0][1] == "available")


async def test_filter_and_sort(rt: Runtime, tmp_path: Path, gemma_path: Path) -> None:
    (tmp_path / "other.gguf").symlink_to(gemma_path.resolve())
    rt.config.update(model_dirs=(tmp_path,))
    rt.catalog.refresh()
    app = LmxApp(rt, system_sampler=frozen_system())
    async with app.run_test(size=(100, 30)) as pilot:
        assert len(table_rows(app, "#model-table")) == 2
        await pilot.press("slash", *"oth")
        assert [r[0] for r in table_rows(app, "#model-table")] == ["other"]
        app.query_one("#model-filter", Input).value = ""
        await pilot.press("enter")  # back to the table
        assert app.focused is app.query_one("#model-table")
        await pilot.press("s")  # by size, largest first
        assert "sorted by size" in str(app.query_one("#model-hint", Static).render())
        assert [r[0] for r in table_rows(app, "#model-table")] == ["other", MODEL]
        # Esc leaves the filter box too, and the next key is the table's again (it typed
        # into the box: "/", "oth", Esc, "s" gave "oths").
        await pilot.press("slash", *"oth", "escape")
        assert app.focused is app.query_one("#model-table")
        await pilot.press("s")
        assert app.query_one("#model-filter", Input).value == "oth"
        await pilot.press("f6", "slash", *"smol", "escape")
        assert app.focused is app.query_one("#hub-repos")
        assert app.query_one("#hub-query", Input).value == "smol"


async def test_chat_streams_and_stops(rt: Runtime) -> None:
    app = LmxApp(rt, system_sampler=frozen_system())
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("f3")
        assert app.focused is app.query_one("#chat-input")
        app.query_one("#chat-temp", Input).value = "2"  # rambles: no early end of text
        chat = app.query_one("#chat-pane")
        status = app.query_one("#chat-status", Static)
        for _ in range(3):  # the model may finish on its own before esc lands: ask again
            await pilot.press("ctrl+l", *"Tell me a very long story.", "enter")
            await until(
                pilot,
                lambda: any(t in str(status.render()) for t in ("esc stops", " tokens · ")),
                what=lambda: str(status.render()),
            )
            await pilot.press("escape")
            await until(pilot, lambda: not chat.busy)  # type: ignore[attr-defined]
            if "stopped" in str(status.render()):
                break
        assert "stopped" in str(status.render())
        convo = chat.conversations[MODEL]  # type: ignore[attr-defined]
        assert convo[0]["content"] == "Tell me a very long story." and convo[1]["content"]
        engine = rt.scheduler.get(MODEL).engine  # type: ignore[union-attr]
        await until(pilot, lambda: engine.stats()["slots_busy"] == 0, 10)
        assert engine.finished["cancelled"] >= 1  # the same engine HTTP requests use


async def test_chat_with_a_cold_model_shows_its_reply_and_goes_through_the_pipeline(
    rt: Runtime,
) -> None:
    """A first-time user: the model is not loaded yet. The reply must appear, and the chat is a
    request like any other: leased (keep_alive, LRU), in the request log and /metrics."""
    assert rt.scheduler.get(MODEL) is None
    app = LmxApp(rt, system_sampler=frozen_system())
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("f3")
        app.query_one("#chat-temp", Input).value = "0"
        await pilot.press(*"Say hello.", "enter")
        chat = app.query_one("#chat-pane")
        await until(pilot, lambda: not chat.busy and len(chat.conversations.get(MODEL, [])) == 2)  # type: ignore[attr-defined]
        reply = chat.conversations[MODEL][1]["content"]  # type: ignore[attr-defined]
        bubbles = [str(w.render()) for w in app.query(".bubble.assistant")]
        assert reply and bubbles == [reply]  # shown, not only counted in the status line
        lm = rt.scheduler.get(MODEL)
        assert lm is not None and lm.leases == 0 and lm.expires_at is not None  # released
        rec = rt.requests.recent()[-1]
        assert (rec.source, rec.model, rec.status) == ("tui", MODEL, 200)
        assert rec.completion_tokens > 0


async def test_a_reasoning_models_thinking_is_shown_apart_and_the_app_stays_up(
    tmp_path: Path, smollm2_path: Path
) -> None:
    """A model whose template opens `<think>`: every token of SmolLM2's reply is thinking.
    The chat shows it in a dimmed, collapsible block with its own token count, says that no
    answer came, and the app keeps running (the reply used to end it with status 0)."""
    from textual.widgets import Collapsible

    from tests.chat_templates import THINKING

    os.link(smollm2_path, tmp_path / "smollm2-think.gguf")
    config = tmp_path / "lmx.toml"
    config.write_text(f"[models.\"smollm2-think\"]\nchat_template = '''{THINKING}'''\n")
    reg = Runtime(make_config(config, model_dirs=[tmp_path]))
    app = LmxApp(reg, system_sampler=frozen_system())
    try:
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.press("f3")
            chat = app.query_one("#chat-pane")
            chat.choose("smollm2-think")  # type: ignore[attr-defined]
            app.query_one("#chat-temp", Input).value = "0"
            await pilot.press(*"Say hello.", "enter")
            await until(pilot, lambda: app.query(".thinking"), what=lambda: "no thinking block")
            block = app.query_one(".thinking", Collapsible)
            # All of SmolLM2's reply is thinking, up to the chat's 1024 tokens: stop it once
            # its count shows (a slow machine needs minutes for the whole budget).
            await until(
                pilot,
                lambda: "tokens" in str(block.title) or not chat.busy,  # type: ignore[attr-defined]
                what=lambda: repr(block.title),
            )
            await pilot.press("escape")
            await until(pilot, lambda: not chat.busy)  # type: ignore[attr-defined]
            assert str(block.title).startswith("thinking · ") and "tokens" in str(block.title)
            text = str(app.query_one(".thinking-text", Static).render())
            assert text.strip()
            answer = [str(w.render()) for w in app.query(".bubble.assistant")][-1]
            assert "went to thinking" in answer or answer.strip(), answer
            assert app.is_running and app.return_code in (None, 0)
    finally:
        reg.close()


async def test_http_requests_show_in_gauges_and_requests_pane(rt: Runtime) -> None:
    server = ServerThread(rt).start()
    app = LmxApp(rt, server=server, system_sampler=frozen_system(), sample_interval=0.1)
    try:
        async with app.run_test(size=(120, 34)) as pilot:
            assert server.url in app.sub_title
            body = {
                "model": MODEL,
                "max_tokens": 30,
                "ignore_eos": True,
                "messages": [{"role": "user", "content": "hi"}],
            }
            r = await asyncio.to_thread(
                httpx.post, server.url + "/v1/chat/completions", json=body, timeout=60
            )
            assert r.status_code == 200
            await until(pilot, lambda: len(table_rows(app, "#requests-table")) == 1)
            row = table_rows(app, "#requests-table")[0]
            assert row[1:6] == [
                "200",
                MODEL,
                "/v1/chat/completions",
                str(r.json()["usage"]["prompt_tokens"]),
                "30",
            ]
            await pilot.press("f4")
            await until(pilot, lambda: bool(app.query(".gauge-figures")))
            figures = str(app.query_one(".gauge-figures", Static).render())
            assert "0/4 busy" in figures and "ttft" in figures
            gpu = str(app.query_one("#gauge-gpu", Static).render())
            assert "no NVIDIA GPU" in gpu
            await asyncio.to_thread(
                httpx.post,
                server.url + "/v1/chat/completions",
                json={"model": "nope", "messages": []},
            )
            await until(pilot, lambda: len(table_rows(app, "#requests-table")) == 2)
            assert table_rows(app, "#requests-table")[1][1] == "400"
    finally:
        server.stop()


async def test_gpu_gauges(rt: Runtime) -> None:
    gpus = (GpuSnapshot(0, "NVIDIA H100", 20_000_000_000, 80_000_000_000, 64),)
    app = LmxApp(rt, system_sampler=frozen_system(gpus), sample_interval=0.05)
    async with app.run_test(size=(120, 34)) as pilot:
        await pilot.press("f4")
        await until(pilot, lambda: "H100" in str(app.query_one("#gauge-gpu", Static).render()))
        assert "util 64%" in str(app.query_one("#gauge-gpu", Static).render())


async def test_port_in_use_is_shown_not_raised(rt: Runtime) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        rt.config.update(port=s.getsockname()[1])
        server, note = start_server(rt)
    assert server is None and "in use" in note
    app = LmxApp(rt, server_note=note, system_sampler=frozen_system())
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause()
        assert "in use" in app.sub_title


async def test_help_and_command_palette(rt: Runtime) -> None:
    app = LmxApp(rt, system_sampler=frozen_system())
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("f1")
        text = str(app.screen.query_one("#help-text", Static).render())
        for key in ("Load", "Unload", "Details", "Quit", "Command palette"):
            assert key in text
        await pilot.press("escape")
        # One command for help, not two (Textual's own "Keys" panel says less than F1).
        titles = [c.title for c in app.get_system_commands(app.screen)]
        assert "Help" in titles and "Keys" not in titles, titles
        await pilot.press("ctrl+p")
        await pilot.press(*"Load smollm2")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await until(pilot, lambda: rt.scheduler.get(MODEL) is not None)


async def test_hub_pull_shows_progress_and_can_be_cancelled(
    hub: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    reg = Runtime(make_config(hf_cache=True, hf_cache_dir=tmp_path / "hub"))
    hub.delay = 0.004  # a slow link: the download is still running when we cancel it
    app = LmxApp(reg, system_sampler=frozen_system())
    try:
        async with app.run_test(size=(120, 34)) as pilot:
            await pilot.press("f6", *"smollm2", "enter")
            await until(pilot, lambda: app.query_one("#hub-repos", DataTable).row_count == 1)
            await pilot.press("enter")
            await until(pilot, lambda: app.query_one("#hub-files", DataTable).row_count == 1)
            await pilot.press("enter")  # pull the selected file
            await pilot.press("f7")
            await until(
                pilot,
                lambda: (
                    bool(table_rows(app, "#downloads-table"))
                    and table_rows(app, "#downloads-table")[0][1] == "running"
                    and "█" in table_rows(app, "#downloads-table")[0][2]  # one cell is 5%
                ),
            )
            row = table_rows(app, "#downloads-table")[0]
            assert row[0] == "smollm2-135m-instruct-q4_1.gguf" and not row[2].endswith(" 0%")
            await pilot.press("c")
            await until(pilot, lambda: table_rows(app, "#downloads-table")[0][1] == "cancelled")
        wait_for(lambda: not list((tmp_path / "hub").rglob("*.lmx-partial")))
    finally:
        hub.delay = 0.0
        reg.downloads.close()
        reg.close()


async def test_a_late_tab_event_does_not_take_the_focus_back(rt: Runtime) -> None:
    """At start-up the first tab's TabActivated can arrive after a key has switched tabs (seen
    under load: F6 then typing went to the model table); it must not move the focus."""
    from textual.widgets._tabbed_content import ContentTab

    app = LmxApp(rt, system_sampler=frozen_system())
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("f6")
        await until(pilot, lambda: app.focused is app.query_one("#hub-query"))
        tabs = app.query_one(TabbedContent)
        late = next(t for t in tabs.query(ContentTab) if t.id and t.id.endswith("models"))
        tabs.post_message(TabbedContent.TabActivated(tabs, late))
        await pilot.pause()
        assert app.focused is app.query_one("#hub-query")
        await pilot.press(*"gguf")
        assert app.query_one("#hub-query", Input).value == "gguf"


async def test_p_pins_the_selected_model(rt: Runtime) -> None:
    app = LmxApp(rt, system_sampler=frozen_system())
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("p")
        assert rt.scheduler.is_pinned(MODEL)
        await until(pilot, lambda: "pinned" in table_rows(app, "#model-table")[0][1])
        await pilot.press("p")
        assert not rt.scheduler.is_pinned(MODEL)


async def test_models_table_fits_80_columns(rt: Runtime) -> None:
    app = LmxApp(rt, system_sampler=frozen_system())
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        table = app.query_one("#model-table", DataTable)
        cols = [str(c.label) for c in table.columns.values()]
        assert "SIZE" in cols and "CTX" in cols and "ID" in cols and "STATE" in cols
        assert "ARCH" not in cols  # the least important went first
        assert table.virtual_size.width <= table.scrollable_content_region.width
        row = table_rows(app, "#model-table")[0]
        assert row[cols.index("SIZE")] == "98.4 MB" and row[cols.index("CTX")] == "8k"
    async with LmxApp(rt, system_sampler=frozen_system()).run_test(size=(140, 30)) as pilot:
        await pilot.pause()
        table = pilot.app.query_one("#model-table", DataTable)
        assert [str(c.label) for c in table.columns.values()][:5] == [
            "ID",
            "STATE",
            "MEMORY",
            "FITS",
            "ARCH",
        ]


@pytest.fixture
def two_models(tmp_path: Path, gemma_path: Path) -> Iterator[Runtime]:
    (tmp_path / "gemma.gguf").symlink_to(gemma_path.resolve())
    probe = Runtime(make_config(model_dirs=[tmp_path]))
    sizes = {m.id: probe.scheduler.estimate_for(m).total for m in probe.catalog.models()}
    probe.close()
    # room for the larger one, not for both
    runtime = Runtime(make_config(model_dirs=[tmp_path], max_memory=max(sizes.values()) + 1000))
    yield runtime
    runtime.close()


async def test_eviction_prompt_names_the_model_it_would_evict(two_models: Runtime) -> None:
    rt = two_models
    load(rt, "gemma")
    app = LmxApp(rt, system_sampler=frozen_system(), sample_interval=0.1)
    async with app.run_test(size=(100, 30)) as pilot:
        await until(pilot, lambda: "gemma" in str(app.query_one("#models-budget").render()))
        ids = [r[0] for r in table_rows(app, "#model-table")]
        app.query_one("#model-table", DataTable).move_cursor(row=ids.index(MODEL))
        await pilot.press("l")
        await until(pilot, lambda: isinstance(app.screen, LoadPrompt))
        text = str(app.screen.query_one("#prompt-text", Static).render())
        assert "would unload" in text and "• gemma" in text
        assert rt.scheduler.get("gemma") is not None  # nothing happened yet
        await pilot.press("y")
        await until(pilot, lambda: rt.scheduler.get(MODEL) is not None)
        assert rt.scheduler.get("gemma") is None


async def test_a_model_too_large_says_why_and_loads_with_a_smaller_ctx(rt: Runtime) -> None:
    info = rt.catalog.resolve(MODEL)
    est = rt.scheduler.estimate_for(info)
    rt.config.update(max_memory=est.weights + est.compute + est.kv_cache // 3)
    app = LmxApp(rt, system_sampler=frozen_system())
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("l")
        await until(pilot, lambda: isinstance(app.screen, LoadPrompt))
        text = str(app.screen.query_one("#prompt-text", Static).render())
        assert "does not fit" in text and "budget" in text and "1  " in text
        assert rt.scheduler.get(MODEL) is None
        option = app.screen.preview.options[0]  # type: ignore[attr-defined]
        await pilot.press("1")
        await until(pilot, lambda: rt.scheduler.get(MODEL) is not None)
        lm = rt.scheduler.get(MODEL)
        assert lm is not None and (lm.options.n_ctx, lm.options.parallel) == (
            option.ctx,
            option.parallel,
        )


async def test_cancel_an_http_request_from_the_requests_tab(rt: Runtime) -> None:
    server = ServerThread(rt).start()
    app = LmxApp(rt, server=server, system_sampler=frozen_system(), sample_interval=0.1)
    try:
        async with app.run_test(size=(120, 34)) as pilot:
            stream = await asyncio.to_thread(BackgroundStream, server.url, MODEL, 4000)
            await pilot.press("f5")
            await until(pilot, lambda: len(table_rows(app, "#inflight-table")) == 1)
            await until(pilot, lambda: int(table_rows(app, "#inflight-table")[0][6]) > 0)
            row = table_rows(app, "#inflight-table")[0]
            assert row[1] == MODEL and row[2] == "openai" and row[4] == "decode"
            app.query_one("#inflight-table", DataTable).focus()
            await pilot.press("x")
            lines = await asyncio.to_thread(stream.finish)
            assert '"finish_reason":"cancelled"' in lines[-2].replace(" ", "")
            await until(pilot, lambda: not table_rows(app, "#inflight-table"))
            await until(pilot, lambda: bool(table_rows(app, "#requests-table")))
            assert table_rows(app, "#requests-table")[-1][-1] == "cancelled"
            app.query_one("#requests-table", DataTable).focus()
            await pilot.press("enter")  # the finished request's details
            await until(pilot, lambda: isinstance(app.screen, RequestDetailScreen))
            blocks = [str(w.render()) for w in app.screen.query(".detail-block")]
            assert "Write a long story." in blocks[0] and blocks[1]
    finally:
        server.stop()


async def test_log_records_go_to_the_pane_filtered_by_level_and_text(rt: Runtime) -> None:
    app = LmxApp(rt, system_sampler=frozen_system())
    async with app.run_test(size=(120, 34)) as pilot:
        await pilot.press("f5")
        logging.getLogger("server.test").info("an info line about smollm2")
        logging.getLogger("huggingface_hub.test").warning("Retrying in 4s")
        pane = app.query_one(RequestsPane)
        log = app.query_one("#server-log", RichLog)

        def shown() -> str:
            return "\n".join(line.text for line in log.lines)

        await until(pilot, lambda: "Retrying in 4s" in shown() and "an info line" in shown())
        await pilot.press("v")  # WARNING and up
        await until(pilot, lambda: "an info line" not in shown())
        assert "Retrying in 4s" in shown() and pane.level == "WARNING"
        await pilot.press("v", "v", "v")  # ERROR, DEBUG, INFO
        app.query_one("#log-filter", Input).value = "smollm2"
        await until(pilot, lambda: "Retrying" not in shown() and "an info line" in shown())


async def test_unreachable_hub_is_reported_in_the_pane_at_once(
    rt: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as dead:
        dead.bind(("127.0.0.1", 0))  # bound, never listening: refused at once
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{dead.getsockname()[1]}")
        app = LmxApp(rt, system_sampler=frozen_system())
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.press("f6", *"smollm2", "enter")
            status = app.query_one("#hub-status", Static)
            await until(pilot, lambda: "cannot be reached" in str(status.render()), 10)


async def test_hub_results_sizes_fit_on_disk_and_the_offer_to_chat(
    hub: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    reg = Runtime(make_config(hf_cache=True, hf_cache_dir=tmp_path / "hub", max_memory=10**10))
    app = LmxApp(reg, system_sampler=frozen_system())
    try:
        async with app.run_test(size=(140, 34)) as pilot:
            await pilot.press("f6", *"gguf", "enter")
            await until(
                pilot,
                lambda: app.query_one("#hub-repos", DataTable).row_count == 2,
                what=lambda: (
                    f"focus={app.focused!r} "
                    f"status={app.query_one('#hub-status', Static).render()!s}"
                ),
            )
            await until(pilot, lambda: all(r[3] != "…" for r in table_rows(app, "#hub-repos")))
            rows = {r[0]: r for r in table_rows(app, "#hub-repos")}
            big = rows["someone/Big-Model-GGUF"]
            assert big[3] == "2.0 GB to 70.0 GB" and big[4] == "IQ4_XS, Q2_K"
            assert rows[HUB_REPO][1] == "500" and rows[HUB_REPO][4] == "Q4_1"
            app.query_one("#hub-repos", DataTable).move_cursor(row=list(rows).index(HUB_REPO))
            await pilot.press("enter")
            await until(pilot, lambda: app.query_one("#hub-files", DataTable).row_count == 1)
            assert table_rows(app, "#hub-files")[0][4] == ""  # not on disk yet
            await pilot.press("enter")  # pull it: progress at once, on the Hub's status line
            status = app.query_one("#hub-status", Static)
            await until(pilot, lambda: "pull" in str(status.render()))
            await until(pilot, lambda: isinstance(app.screen, PulledPrompt), 60)
            await pilot.press("c")  # chat with it
            await until(pilot, lambda: app.query_one(TabbedContent).active == "chat")
            model_id = app.query_one("#chat-pane").model  # type: ignore[attr-defined]
            assert model_id == f"{HUB_REPO}/smollm2-135m-instruct-q4_1".lower()
            await pilot.press("f6")
            app.query_one("#hub-repos", DataTable).focus()
            await pilot.press("enter")
            await until(pilot, lambda: table_rows(app, "#hub-files")[0][4] == f"✓ {model_id}")
    finally:
        reg.downloads.close()
        reg.close()


async def test_monitor_charts_history_and_slots(rt: Runtime) -> None:
    load(rt, MODEL)
    app = LmxApp(rt, system_sampler=frozen_system(), sample_interval=0.05)
    async with app.run_test(size=(140, 50)) as pilot:
        await pilot.press("f4")
        gauges = app.query_one(GaugesPane)
        await until(pilot, lambda: len(gauges.series["cpu"].get("cpu", ())) >= 3)
        await until(pilot, lambda: bool(app.query(".gauge-slots")))
        await until(pilot, lambda: "idle" in str(app.query_one(".gauge-slots", Static).render()))
        assert MODEL in gauges.series["tps"] and not app.query_one("#chart-vram").display
        await until(pilot, lambda: gauges._drawn > 0)
        chart = app.query_one("#chart-cpu")
        assert "seconds ago" in str(chart.render_lines(chart.region.reset_offset))  # type: ignore[attr-defined]
        budget = str(app.query_one("#monitor-budget").render())
        assert MODEL in budget and "free" in budget and "est" in budget


# ----- snapshots (frozen data; Textual is pinned exactly) --------------------------------------


def _snap_app() -> LmxApp:
    # A fixed budget: the default is a share of the RAM free now, different on every machine;
    # no prompt cache on disk: what earlier tests left there would show in the memory bar.
    config = make_config(max_memory=4_000_000_000, prompt_cache_disk=0)
    return LmxApp(Runtime(config), system_sampler=frozen_system(), sample_interval=60)


def test_snapshot_models(snap_compare: Callable[..., bool]) -> None:
    assert snap_compare(_snap_app(), terminal_size=(80, 24))


def test_snapshot_help(snap_compare: Callable[..., bool]) -> None:
    assert snap_compare(_snap_app(), press=["f1"], terminal_size=(80, 24))


def test_snapshot_chat(snap_compare: Callable[..., bool]) -> None:
    assert snap_compare(_snap_app(), press=["f3"], terminal_size=(80, 24))


def test_snapshot_monitor(snap_compare: Callable[..., bool]) -> None:
    assert snap_compare(_snap_app(), press=["f4"], terminal_size=(100, 24))


# ----- the installed command in a real terminal ------------------------------------------------


def _tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, check=True).stdout


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt install tmux)")
def test_installed_lmx_in_tmux_80x24(tmp_path: Path) -> None:
    """A first-time user over SSH: the app at 80x24, a Hub search with no network, a load. The
    failure shows in the Hub pane at once; no log line is ever drawn over the screen (they go
    to the log pane and the log file)."""
    lmx = Path(sys.executable).parent / "lmx"
    assert lmx.exists(), "the lmx console script is installed with the project"
    session = f"lmx-test-{os.getpid()}"
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))  # bound, never listening: a hub that cannot be reached
    env = (
        f"HF_HOME={tmp_path} LMX_CONFIG={tmp_path / 'none.toml'} XDG_STATE_HOME={tmp_path}"
        f" HF_ENDPOINT=http://127.0.0.1:{dead.getsockname()[1]}"
    )
    (tmp_path / "none.toml").write_text("")
    _tmux(
        "new-session",
        "-d",
        "-s",
        session,
        "-x",
        "80",
        "-y",
        "24",
        f"env {env} {lmx} --port 0; echo EXITED $?; sleep 30",
    )
    try:

        def screen() -> str:
            return _tmux("capture-pane", "-p", "-t", session)

        def keys(*k: str) -> None:
            _tmux("send-keys", "-t", session, *k)

        wanted = (MODEL, "serving http://127.0.0.1:", "Load", "Quit", "SIZE", "CTX")
        wait_for(lambda: all(t in screen() for t in wanted), 60)
        keys("F6")
        wait_for(lambda: "search the hub" in screen(), 10)
        keys("smollm2", "Enter")
        wait_for(lambda: "cannot be reached" in screen(), 10)
        keys("F2")
        wait_for(lambda: "filter models" in screen(), 10)
        keys("l")
        wait_for(lambda: "ready" in screen(), 60)
        log_file = tmp_path / "lmx" / "lmx.log"
        wait_for(lambda: log_file.exists() and "loaded" in log_file.read_text(), 10)
        for noise in ("WARNING", "INFO", "Retrying", "Traceback", "uvicorn"):
            assert noise not in screen(), screen()
        keys("C-q")
        wait_for(lambda: "EXITED" in screen(), 20)
        text = screen()
        assert "EXITED 0" in text and "Traceback" not in text
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
        dead.close()
