"""The Textual app, driven by Pilot against the real rt, model and embedded server."""

from __future__ import annotations

import asyncio
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
from textual.widgets import DataTable, Input, Static

from lmx_tui.app import LmxApp, start_server
from server.runner import ServerThread
from server.runtime import Runtime
from server.telemetry import GpuSnapshot, SystemSnapshot
from tests.conftest import make_config, wait_for

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
                    and not table_rows(app, "#downloads-table")[0][2].endswith(" 0%")
                ),
            )
            row = table_rows(app, "#downloads-table")[0]
            assert row[0] == "smollm2-135m-instruct-q4_1.gguf" and "█" in row[2]
            await pilot.press("c")
            await until(pilot, lambda: table_rows(app, "#downloads-table")[0][1] == "cancelled")
        wait_for(lambda: not list((tmp_path / "hub").rglob("*.lmx-partial")))
    finally:
        hub.delay = 0.0
        reg.downloads.close()
        reg.close()


# ----- snapshots (frozen data; Textual is pinned exactly) --------------------------------------


def _snap_app() -> LmxApp:
    return LmxApp(Runtime(make_config()), system_sampler=frozen_system(), sample_interval=60)


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
    lmx = Path(sys.executable).parent / "lmx"
    assert lmx.exists(), "the lmx console script is installed with the project"
    session = f"lmx-test-{os.getpid()}"
    env = f"HF_HOME={tmp_path} LMX_CONFIG={tmp_path / 'none.toml'}"
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

        wanted = (MODEL, "serving http://127.0.0.1:", "Load", "Quit")
        wait_for(lambda: all(t in screen() for t in wanted), 60)
        _tmux("send-keys", "-t", session, "C-q")
        wait_for(lambda: "EXITED" in screen(), 20)
        text = screen()
        assert "EXITED 0" in text and "Traceback" not in text
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
