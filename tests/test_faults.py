"""Faults a team server meets: a disk that fills mid-download, a model file deleted or replaced
while loaded, SIGTERM during a load, an unload under running streams, two loads of one model.
Each is driven through a real HTTP client against a real server."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server.discovery import scan_hf_cache
from server.events import LmxEvent
from server.runner import ServerThread
from server.runtime import Runtime
from tests.conftest import HUB_REPO, make_config, wait_for
from tests.hub import FakeHub
from tests.test_cli import LMX

MODEL = "smollm2-135m-instruct.q4_1"


# ----- the disk fills in the middle of a download -------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 160 MB tmpfs: room for the model (98 MB) when the download starts."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=160m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}): needs root")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(folder: Path) -> Path:
    """Take every free byte of the filesystem holding `folder`."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    block = b"\0" * (1 << 16)
    try:
        while True:
            os.write(fd, block)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def test_a_disk_that_fills_mid_download_fails_the_job_and_leaves_nothing(
    small_disk: Path, hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(small_disk / "state"))  # the queue's file too
    cache = small_disk / "hub"
    rt = Runtime(make_config(hf_cache_dir=cache, hf_cache=True))
    hub.delay = 0.002  # a link slow enough to fill the disk under it
    try:
        with ServerThread(rt) as srv:
            r = httpx.post(
                srv.url + "/admin/downloads", json={"repo": HUB_REPO, "quant": "q4_1"}, timeout=30
            )
            assert r.status_code == 200, r.text
            job = r.json()["downloads"][0]["id"]

            def state() -> dict[str, object]:
                jobs = httpx.get(srv.url + "/admin/downloads", timeout=60).json()["downloads"]
                return next(j for j in jobs if j["id"] == job)  # type: ignore[no-any-return]

            wait_for(lambda: int(state()["done"]) > 4 << 20, timeout=60)  # type: ignore[call-overload]
            filler = fill(small_disk)
            wait_for(lambda: state()["state"] == "failed", timeout=60)
            error = str(state()["error"])
            assert "disk filled up" in error and "partial file was removed" in error
            assert "\n" not in error
            filler.unlink()
            assert not list(cache.rglob("*.lmx-partial"))
            assert not list(small_disk.rglob("*.tmp"))
            assert scan_hf_cache(cache) == []
            rt.catalog.refresh()
            listed = httpx.get(srv.url + "/v1/models", timeout=60).json()["data"]
            assert not any(HUB_REPO.lower() in m["id"] for m in listed)
            saved = json.loads((small_disk / "state" / "lmx" / "downloads.json").read_text())
            assert [j["state"] for j in saved if j["id"] == job] == ["failed"]
            # With room again the same job resumes and completes.
            hub.delay = 0.0
            assert (
                httpx.post(srv.url + f"/admin/downloads/{job}/resume", timeout=60).status_code
                == 200
            )
            wait_for(lambda: state()["state"] == "done", timeout=120)
            assert len(scan_hf_cache(cache)) == 1
    finally:
        hub.delay = 0.0
        rt.close()


# ----- a model file deleted or replaced while it is loaded ---------------------------------------


def stream_lines(url: str, body: dict[str, object], path: str) -> tuple[list[str], threading.Event]:
    """A streaming request in a thread; returns its lines (filling) and a started event."""
    lines: list[str] = []
    started = threading.Event()

    def run() -> None:
        with httpx.stream("POST", url + path, json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                    started.set()
        lines.append("<end>")

    threading.Thread(target=run, daemon=True).start()
    assert started.wait(60), "the stream did not start"
    return lines, started


LONG = {
    "model": "m",
    "stream": True,
    "max_tokens": 300,
    "ignore_eos": True,
    "messages": [{"role": "user", "content": "Write a long story."}],
}


def test_a_file_deleted_or_replaced_while_loaded_serves_until_unload(
    tmp_path: Path, smollm2_path: Path, gemma_path: Path
) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copyfile(smollm2_path, folder / "m.gguf")
    rt = Runtime(make_config(model_dirs=[folder], include_default_model=False))
    try:
        with ServerThread(rt) as srv:
            lines, _ = stream_lines(srv.url, LONG, "/v1/chat/completions")
            (folder / "m.gguf").unlink()  # deleted while it streams
            wait_for(lambda: lines[-1:] == ["<end>"], timeout=120)
            assert lines[-2] == "data: [DONE]" and not any('"error"' in x for x in lines)
            # Still loaded from memory: it keeps answering.
            chat = {**LONG, "stream": False, "max_tokens": 3}
            r = httpx.post(srv.url + "/v1/chat/completions", json=chat, timeout=60)
            assert r.status_code == 200
            # Replaced by another model's file while loaded.
            (folder / "m.gguf").symlink_to(gemma_path.resolve())
            r = httpx.post(srv.url + "/v1/chat/completions", json=chat, timeout=60)
            assert r.status_code == 200
            assert rt.scheduler.get("m") is not None
            assert rt.scheduler.get("m").info.architecture == "llama"  # type: ignore[union-attr]
            r = httpx.post(srv.url + "/admin/models/m/unload", timeout=60)
            assert r.status_code == 200 and r.json()["unloaded"] is True
            # After the unload the new file is found and loaded.
            card = httpx.get(srv.url + "/v1/models/m", timeout=60).json()
            assert card["lmx"]["architecture"] == "gemma3"
            r = httpx.post(srv.url + "/v1/chat/completions", json=chat, timeout=120)
            assert r.status_code == 200
            assert rt.scheduler.get("m").info.architecture == "gemma3"  # type: ignore[union-attr]
            # Deleted for good: a clean 404 once unloaded.
            httpx.post(srv.url + "/admin/models/m/unload", timeout=60)
            (folder / "m.gguf").unlink()
            r = httpx.post(srv.url + "/v1/chat/completions", json=chat, timeout=60)
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    finally:
        rt.close()


# ----- an unload while streams run, two loads at once ------------------------------------------


def test_an_unload_under_running_streams_ends_them_with_an_error_event(
    tmp_path: Path,
) -> None:
    rt = Runtime(make_config())
    try:
        with ServerThread(rt) as srv:
            body = {**LONG, "model": MODEL, "max_tokens": 1500}
            openai_lines, _ = stream_lines(srv.url, body, "/v1/chat/completions")
            ollama_body = {
                "model": MODEL,
                "messages": body["messages"],
                "options": {"num_predict": 1500},
            }
            ollama_lines, _ = stream_lines(srv.url, ollama_body, "/api/chat")
            r = httpx.post(srv.url + f"/admin/models/{MODEL}/unload", timeout=60)
            assert r.status_code == 200 and r.json()["unloaded"] is True
            wait_for(lambda: openai_lines[-1:] == ["<end>"] and ollama_lines[-1:] == ["<end>"])
            err = json.loads(openai_lines[-2].removeprefix("data: "))["error"]
            assert "was unloaded" in err["message"] and err["type"] == "server_error"
            assert json.loads(ollama_lines[-2])["error"].endswith("was unloaded while generating")
            # Nothing crashed: the model loads again on the next request.
            r = httpx.post(
                srv.url + "/v1/chat/completions",
                json={**body, "stream": False, "max_tokens": 3},
                timeout=60,
            )
            assert r.status_code == 200
    finally:
        rt.close()


def test_two_concurrent_loads_of_one_model_load_it_once() -> None:
    rt = Runtime(make_config())
    events: list[LmxEvent] = []
    rt.events.subscribe(events.append)
    try:
        with ServerThread(rt) as srv:
            results: list[int] = []
            chat = {
                "model": MODEL,
                "max_tokens": 3,
                "messages": [{"role": "user", "content": "Hi"}],
            }

            def ask() -> None:
                r = httpx.post(srv.url + "/v1/chat/completions", json=chat, timeout=120)
                results.append(r.status_code)

            def admin_load() -> None:
                with httpx.stream("POST", srv.url + f"/admin/models/{MODEL}/load") as r:
                    r.read()
                    results.append(r.status_code)

            threads = [threading.Thread(target=f) for f in (ask, ask, admin_load, admin_load)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert results == [200] * 4
            assert [e.kind for e in events].count("loading") == 1
            assert [e.kind for e in events].count("loaded") == 1
    finally:
        rt.close()


# ----- SIGTERM while a model loads ---------------------------------------------------------------


def test_sigterm_during_a_load_exits_cleanly_and_frees_the_port(gemma_path: Path) -> None:
    folder = gemma_path.parent
    proc = subprocess.Popen(
        [*LMX, "--no-ui", "--port", "0", "--model-dir", str(folder)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "LMX_LOG_LEVEL": "info"},
    )
    assert proc.stdout is not None
    from tests.conftest import serving_url

    url = serving_url(proc.stdout)
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)  # type: ignore[arg-type]
    reader.start()
    try:
        loading = threading.Event()
        outcome: list[str] = []

        def load() -> None:
            try:
                with httpx.stream(
                    "POST", url + "/admin/models/gemma3-270m-q4_k_m/load", timeout=60
                ) as r:
                    for line in r.iter_lines():
                        if line.startswith("event: loading"):
                            loading.set()
                        if line.startswith("event:"):
                            outcome.append(line)
            except httpx.HTTPError as e:
                outcome.append(type(e).__name__)
            loading.set()

        t = threading.Thread(target=load)
        t.start()
        assert loading.wait(60)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        t.join(30)
        assert not t.is_alive()
        reader.join(10)
        text = "".join(out)
        assert "Traceback" not in text and "Segmentation" not in text, text
        port = int(url.rsplit(":", 1)[1])
        with socket.socket() as s:  # the port is free again
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
