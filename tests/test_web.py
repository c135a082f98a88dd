"""`lmx --web`: the app in a browser (textual-serve), opened in headless Chromium."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.browser import TEXTUAL_DRAWN as DRAWN
from tests.browser import capture, chromium, free_port
from tests.conftest import wait_for


@contextmanager
def lmx_web(tmp_path: Path, *flags: str) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    port = free_port()
    (tmp_path / "none.toml").write_text("")
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf"),
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "LMX_CONFIG": str(tmp_path / "none.toml"),
    }
    lmx = Path(sys.executable).parent / "lmx"
    proc = subprocess.Popen(
        [str(lmx), "--web", "--web-port", str(port), "--port", "0", *flags],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its browser sessions' apps are in its group: ended with it
    )
    try:
        yield f"http://127.0.0.1:{port}", proc
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code in (200, 401)
    except httpx.HTTPError:
        return False


@pytest.mark.skipif(
    chromium() is None, reason="chromium is not installed (apt-get install chromium)"
)
def test_the_app_in_headless_chromium(tmp_path: Path) -> None:
    with lmx_web(tmp_path, "--no-server") as (url, _):
        wait_for(lambda: answers(url), 60)
        shot = tmp_path / "web.png"
        lit = capture(url + "/", ready=DRAWN, text_js=DRAWN, out=shot, timeout=90)
        assert int(lit) > 5000  # the app drew its screen in the page
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
        # the browser session ran the lmx app itself, which logs to its file
        wait_for(lambda: (tmp_path / "state" / "lmx" / "lmx.log").exists())


def test_web_follows_the_api_key_rules(tmp_path: Path) -> None:
    (tmp_path / "none.toml").write_text("")
    out = subprocess.run(
        [str(Path(sys.executable).parent / "lmx"), "--web", "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "LMX_CONFIG": str(tmp_path / "none.toml")},
    )
    assert out.returncode == 2 and "without an API key" in out.stderr
    with lmx_web(tmp_path, "--no-server", "--api-key", "sesame") as (url, _):
        wait_for(lambda: answers(url), 60)
        assert httpx.get(url + "/").status_code == 401
        r = httpx.get(url + "/", params={"key": "sesame"})
        assert r.status_code == 200 and "lmx" in r.text and "lmx_key" in r.cookies
        assert httpx.get(url + "/", cookies={"lmx_key": "sesame"}).status_code == 200
        assert httpx.get(url + "/", params={"key": "wrong"}).status_code == 401


def test_each_browser_session_runs_lmx_with_the_same_flags_less_web() -> None:
    from lmx_tui.web import session_command
    from server.cli import web_session_argv

    argv = ["--web", "--web-port", "9000", "--port", "0", "--web-port=1", "--model-dir", "m"]
    assert web_session_argv(argv) == ["--port", "0", "--model-dir", "m"]
    assert session_command(["--model-dir", "a b"]).endswith("-m lmx_tui.cli --model-dir 'a b'")
