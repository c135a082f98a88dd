"""Headless Chromium driven over the DevTools protocol: open a page, wait until a script says
it is ready, read its text and take a screenshot. Used by the web test and screenshots/."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx

# As the machine notes say: no sandbox as root, no GPU, and no background connections (the
# network is closed; Chromium would keep trying).
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)

# A textual-serve page is ready when the app has drawn: light pixels (text) on the terminal's
# canvas, after the page's first byte from the app. The script returns how many.
TEXTUAL_DRAWN = """(() => {
  if (!document.body.classList.contains('-first-byte')) return 0;
  const c = document.querySelector('canvas.xterm-text-layer');
  if (!c) return 0;
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let n = 0;
  for (let i = 0; i < d.length; i += 4) if (d[i] + d[i + 1] + d[i + 2] > 300) n++;
  return n > 5000 ? n : 0;
})()"""


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Page:
    """One tab, spoken to over its DevTools websocket."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self._ids = itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        n = next(self._ids)
        await self.ws.send_str(json.dumps({"id": n, "method": method, "params": params}))
        async for msg in self.ws:
            data = json.loads(msg.data)
            if data.get("id") == n:
                if "error" in data:
                    raise RuntimeError(f"{method}: {data['error']}")
                return data.get("result", {})  # type: ignore[no-any-return]
        raise RuntimeError("the browser closed the connection")

    async def evaluate(self, script: str) -> Any:
        r = await self.call("Runtime.evaluate", expression=script, returnByValue=True)
        return r.get("result", {}).get("value")


async def _capture(
    debug_url: str, url: str, ready: str, text_js: str, out: Path | None, timeout: float
) -> str:
    async with aiohttp.ClientSession() as session:
        async with session.put(f"{debug_url}/json/new?{url}") as r:
            target = await r.json(content_type=None)
        async with session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            page = Page(ws)
            deadline = time.monotonic() + timeout
            while not await page.evaluate(ready):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the page was not ready: {ready}")
                await asyncio.sleep(0.25)  # poll the page's ready script, up to the deadline
            text = str(await page.evaluate(text_js) or "")
            if out is not None:
                shot = await page.call("Page.captureScreenshot", format="png")
                out.write_bytes(base64.b64decode(shot["data"]))
            return text


def capture(
    url: str,
    *,
    ready: str,
    text_js: str = "document.body.innerText",
    out: Path | None = None,
    size: tuple[int, int] = (1280, 800),
    timeout: float = 60,
) -> str:
    """Open `url` in headless Chromium, wait until the script `ready` is true, and return the
    text `text_js` reads (a screenshot to `out` as well)."""
    exe = chromium()
    if exe is None:
        raise RuntimeError("chromium is not installed (apt-get install chromium)")
    port = free_port()
    # Chromium's helper processes may still write to the profile as the browser exits: the
    # whole process group is stopped, and what they leave behind does not fail the capture.
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        proc = subprocess.Popen(
            [
                exe,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={profile}",
                f"--window-size={size[0]},{size[1]}",
                f"--remote-debugging-port={port}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own process group, helpers included
        )
        try:
            debug_url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 30
            while True:
                try:
                    httpx.get(debug_url + "/json/version", timeout=2).raise_for_status()
                    break
                except httpx.HTTPError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)  # Chromium is starting: poll its DevTools port
            return asyncio.run(_capture(debug_url, url, ready, text_js, out, timeout))
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
