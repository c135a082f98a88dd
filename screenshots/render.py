"""Renders every screen of the real app (real runtime, real model, real server) to SVG.

uv run python screenshots/render.py
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from lmx_tui.app import LmxApp  # noqa: E402
from server.runner import ServerThread  # noqa: E402
from server.runtime import Runtime  # noqa: E402
from server.settings import ConfigStore  # noqa: E402

SIZE = (110, 32)


async def main() -> None:
    config = ConfigStore(flags={"port": 0, "ctx": 2048, "hf_cache": False}, env={})
    registry = Runtime(config)
    server = ServerThread(registry).start()
    app = LmxApp(registry, server=server, sample_interval=0.25)
    shots: list[str] = []

    async def shot(name: str) -> None:
        await pilot.pause(0.3)
        app.save_screenshot(str(ROOT / f"{name}.svg"))
        shots.append(name)

    try:
        async with app.run_test(size=SIZE) as pilot:
            await shot("models")
            await pilot.press("l")
            while registry.scheduler.get(registry.catalog.resolve("default").id) is None:
                await pilot.pause(0.1)
            await shot("models-loaded")
            await pilot.press("enter")
            await shot("model-details")
            await pilot.press("escape", "f1")
            await shot("help")
            await pilot.press("escape", "f3")
            app.query_one("#chat-system").value = "You are concise."  # type: ignore[attr-defined]
            await pilot.press(*"Name three colours.", "enter")
            chat = app.query_one("#chat-pane")
            await pilot.pause(0.2)
            while chat.busy:  # type: ignore[attr-defined]
                await pilot.pause(0.1)
            await shot("chat")
            body = {
                "model": "default",
                "max_tokens": 400,
                "ignore_eos": True,
                "stream": False,
                "messages": [{"role": "user", "content": "Write a story."}],
            }
            busy = asyncio.gather(
                *(
                    asyncio.to_thread(
                        httpx.post, server.url + "/v1/chat/completions", json=body, timeout=120
                    )
                    for _ in range(3)
                )
            )
            await pilot.press("f4")
            engine = registry.scheduler.loaded()[0].engine
            t0 = time.monotonic()
            while time.monotonic() - t0 < 1.5 or not engine.stats()["slots_busy"]:
                await pilot.pause(0.1)
            await shot("monitor")
            await busy
            await pilot.press("f5")
            await shot("requests")
            await pilot.press("f7")
            await shot("downloads")
            await pilot.press("ctrl+p")
            await pilot.press(*"load")
            await shot("command-palette")
    finally:
        server.stop()
        registry.close()
    print("wrote", ", ".join(f"screenshots/{s}.svg" for s in shots))


if __name__ == "__main__":
    asyncio.run(main())
