"""Hub search and the download queue, against a local stand-in for the hub serving real files."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest

from server.discovery import scan_hf_cache
from server.downloads import DownloadQueue
from server.hub import pick, repo_files, search
from server.runner import ServerThread
from server.runtime import Runtime
from tests.conftest import make_config, wait_for
from tests.hub import FakeHub

REPO = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF"
FILE = "smollm2-135m-instruct-q4_1.gguf"


def test_search_and_listing(hub: FakeHub) -> None:
    assert [r["id"] for r in search("gguf")] == [REPO, "someone/Big-Model-GGUF"]
    assert [r["id"] for r in search("smollm2")] == [REPO]
    big = repo_files("someone/Big-Model-GGUF", budget=10 * 10**9)
    files = {f["name"]: f for f in big["files"]}
    split = files["big-model-Q8_0.gguf"]  # shards grouped as one model
    assert split["size"] == 70 * 10**9 and len(split["files"]) == 2 and not split["fits"]
    assert files["big-model-IQ4_XS.gguf"]["quantization"] == "IQ4_XS"
    assert big["recommended"] == "big-model-IQ4_XS.gguf"  # best quality that fits
    with pytest.raises(ValueError, match="no Q5_K_M file; it has: IQ4_XS, Q2_K, Q8_0"):
        pick(big, "q5_k_m", None)
    with pytest.raises(LookupError, match="no repository 'nobody/nothing'"):
        repo_files("nobody/nothing", budget=1)


def queue_for(tmp: Path) -> DownloadQueue:
    return DownloadQueue(tmp / "hub", tmp / "state.json", concurrency=1)


def add(q: DownloadQueue, hub: FakeHub) -> str:
    listing = repo_files(REPO, budget=10**10)
    choice = pick(listing, "q4_1", None)
    f = choice.files[0]
    return q.add(REPO, f, choice.sha256[f], choice.size, listing["commit"]).id


def test_download_lands_verified_in_the_hf_cache(
    hub: FakeHub, tmp_path: Path, smollm2_path: Path
) -> None:
    q = queue_for(tmp_path)
    try:
        job = add(q, hub)
        assert add(q, hub) == job  # the same file asked for twice downloads once
        d = q.wait(job, 120)
        assert d.state == "done" and d.done == d.size, d.error
        models = scan_hf_cache(tmp_path / "hub")  # huggingface_hub reads what lmx wrote
        assert [m.id for m in models] == [f"{REPO.lower()}/smollm2-135m-instruct-q4_1"]
        assert models[0].usable
        assert q.snapshot_path(d).read_bytes() == smollm2_path.read_bytes()
    finally:
        q.close()


def test_cut_connection_resumes_with_a_range(hub: FakeHub, tmp_path: Path) -> None:
    q = queue_for(tmp_path)
    try:
        hub.ranges.clear()
        hub.cut_after = 10_000_000
        d = q.wait(add(q, hub), 120)
        assert d.state == "done", d.error
        assert hub.ranges[0] == 0 and 0 < hub.ranges[1] <= 10_000_000  # resumed, not restarted
        assert len(hub.ranges) == 2
    finally:
        q.close()


def test_corrupt_bytes_are_rejected_and_nothing_is_visible(hub: FakeHub, tmp_path: Path) -> None:
    q = queue_for(tmp_path)
    hub.corrupt = True
    try:
        d = q.wait(add(q, hub), 120)
        assert d.state == "failed" and "corrupt" in (d.error or "") and "sha256" in (d.error or "")
        assert scan_hf_cache(tmp_path / "hub") == []
        assert not list((tmp_path / "hub").rglob("*.lmx-partial"))
    finally:
        hub.corrupt = False
        q.close()


def test_restart_resumes_half_done_and_queued(hub: FakeHub, tmp_path: Path) -> None:
    q = queue_for(tmp_path)
    hub.delay = 0.004  # a slow link: the download is under way when we pause it
    try:
        job = add(q, hub)
        wait_for(lambda: q.get(job).done > 0)
        q.pause(job)
    finally:
        hub.delay = 0.0
    q.close()
    half = q.get(job)
    assert 0 < half.done < half.size
    partial = tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-135M-Instruct-GGUF" / "blobs"
    # A restart finds the job (paused) and its partial bytes; resuming continues from them.
    q2 = queue_for(tmp_path)
    try:
        again = q2.get(job)
        assert again.state == "paused" and again.done == half.done
        hub.ranges.clear()
        q2.resume(job)
        q2.start()
        d = q2.wait(job, 120)
        assert d.state == "done", d.error
        assert hub.ranges[0] == half.done
        assert not list(partial.glob("*.lmx-partial"))
    finally:
        q2.close()


def test_cancel_forgets_the_partial(hub: FakeHub, tmp_path: Path) -> None:
    q = queue_for(tmp_path)
    try:
        job = add(q, hub)
        q.pause(job)
        d = q.cancel(job)
        assert d.state == "cancelled"
        assert not list((tmp_path / "hub").rglob("*.lmx-partial"))
        assert scan_hf_cache(tmp_path / "hub") == []
    finally:
        q.close()


# ----- as users reach it: the CLI, the admin API, Ollama's /api/pull ---------------------------


def lmx(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HOME": str(home / "hf"), "XDG_STATE_HOME": str(home / "state")}
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_cli_search_pull_ls_rm(hub: FakeHub, tmp_path: Path) -> None:
    r = lmx("search", "smollm2", home=tmp_path)
    assert r.returncode == 0 and REPO in r.stdout
    r = lmx("search", "nothingmatches", home=tmp_path)  # as grep: says so, and fails
    assert r.returncode == 1 and not r.stdout
    assert r.stderr.strip() == "lmx: no GGUF repositories match 'nothingmatches'"
    r = lmx("search", "x", "--files", "someone/Big-Model-GGUF", home=tmp_path)
    assert "* big-model-IQ4_XS.gguf" in r.stdout and "too big" in r.stdout
    r = lmx("pull", f"{REPO}:Q4_1", home=tmp_path)
    assert r.returncode == 0, r.stderr
    model = f"{REPO.lower()}/smollm2-135m-instruct-q4_1"
    assert r.stdout.strip() == f"pulled {model}" and "[####" in r.stderr
    ls = lmx("ls", home=tmp_path)
    assert model in ls.stdout and "hf-cache" in ls.stdout
    assert lmx("rm", model, home=tmp_path).returncode == 0
    assert model not in lmx("ls", home=tmp_path).stdout
    # Pulled again after rm: fetched again (the queue's old `done` job has no file any more).
    r = lmx("pull", f"{REPO}:Q4_1", home=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == f"pulled {model}", r.stderr
    assert model in lmx("ls", home=tmp_path).stdout
    assert lmx("rm", model, home=tmp_path).returncode == 0
    bad = lmx("pull", f"{REPO}:Q9_9", home=tmp_path)
    assert bad.returncode == 2 and "no Q9_9 file; it has: Q4_1" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    bad = lmx("pull", "nobody/nothing", home=tmp_path)
    assert bad.returncode == 2 and "no repository 'nobody/nothing'" in bad.stderr
    bad = lmx("rm", "default", home=tmp_path)
    assert bad.returncode == 2 and "used in place" in bad.stderr


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, Runtime]]:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    reg = Runtime(make_config(hf_cache=True, hf_cache_dir=tmp_path / "hub"))
    with ServerThread(reg) as srv:
        yield srv, reg
    reg.downloads.close()
    reg.close()


def test_admin_downloads_and_hub_routes(hub: FakeHub, served: tuple[Any, Runtime]) -> None:
    srv, _reg = served
    found = httpx.get(srv.url + "/admin/hub/search", params={"q": "smol"}).json()
    assert [r["id"] for r in found["results"]] == [REPO]
    files = httpx.get(srv.url + f"/admin/hub/{REPO}/files").json()
    assert files["recommended"] == FILE
    assert httpx.get(srv.url + "/admin/hub/nobody/nothing/files").status_code == 404
    r = httpx.post(srv.url + "/admin/downloads", json={"repo": REPO, "quant": "Q4_1"})
    (job,) = r.json()["downloads"]
    wait_for(
        lambda: httpx.get(srv.url + "/admin/downloads").json()["downloads"][0]["state"] == "done",
        120,
    )
    model = f"{REPO.lower()}/smollm2-135m-instruct-q4_1"
    ids = [m["id"] for m in httpx.get(srv.url + "/v1/models").json()["data"]]
    assert model in ids  # verified, then visible as a model
    again = httpx.post(srv.url + "/admin/downloads", json={"repo": REPO, "quant": "Q4_1"})
    assert again.json()["downloads"][0]["id"] == job["id"]  # dedupe
    bad = httpx.post(srv.url + "/admin/downloads", json={"repo": REPO, "quant": "Q8_0"})
    assert bad.status_code == 400 and "no Q8_0 file" in bad.json()["error"]["message"]
    assert httpx.delete(srv.url + "/admin/downloads/nope").status_code == 404


def test_ollama_pull_and_delete(hub: FakeHub, served: tuple[Any, Runtime]) -> None:
    srv, _reg = served
    client = ollama.Client(host=srv.url, timeout=120)
    statuses = [p.status for p in client.pull(f"hf.co/{REPO}:Q4_1", stream=True)]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    model = f"{REPO.lower()}/smollm2-135m-instruct-q4_1"
    assert model in {m.model.removesuffix(":latest") for m in client.list().models}
    client.delete(model)
    assert model not in {m.model.removesuffix(":latest") for m in client.list().models}
    with pytest.raises(ollama.ResponseError) as e:
        client.pull("llama3")
    assert e.value.status_code == 501 and "hf.co/ORG/REPO" in e.value.error


def test_ollama_pull_stream_survives_a_download_that_ends_between_lines(
    served: tuple[Any, Runtime],
) -> None:
    """The download thread can finish while a progress line is going out: the stream then ends
    with success, not a dropped connection (CI saw `StopIteration` in the generator)."""
    import asyncio

    from server.api.ollama import _pull_progress
    from server.downloads import Download

    _srv, rt = served
    job = Download("race", REPO, "x.gguf", "ab" * 32, 10, "c" * 40, state="running", done=3)

    async def drive() -> list[dict[str, Any]]:
        out = []
        async for raw in _pull_progress(rt, [job]):
            out.append(httpx.Response(200, content=raw).json())
            if out[-1]["status"].startswith("pulling ab"):
                job.state, job.done = "done", 10  # finished after the loop saw it running
        return out

    lines = asyncio.run(drive())
    assert [x["status"] for x in lines] == [
        "pulling manifest",
        f"pulling {'ab' * 6}",
        "verifying sha256 digest",
        "success",
    ]


def test_no_network_is_one_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port with nothing listening: the hub is unreachable
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env_hub = f"http://127.0.0.1:{port}"
    for args in (["search", "llama"], ["pull", f"{REPO}:Q4_1"]):
        r = subprocess.run(
            [sys.executable, "-m", "server.cli", *args],
            capture_output=True,
            text=True,
            timeout=120,
            env={
                **os.environ,
                "HF_ENDPOINT": env_hub,
                "HF_HOME": str(tmp_path / "hf"),
                "XDG_STATE_HOME": str(tmp_path / "state"),
            },
        )
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("lmx: error:"), r.stderr
        assert "Traceback" not in r.stderr


def test_a_file_larger_than_the_free_disk_is_refused(
    hub: FakeHub, tmp_path: Path, smollm2_path: Path
) -> None:
    hub.add("someone/Huge-GGUF", "huge-Q4_0.gguf", smollm2_path)
    hub.repos["someone/Huge-GGUF"]["huge-Q4_0.gguf"].size = 10**15  # the hub says 1 PB
    q = queue_for(tmp_path)
    try:
        listing = repo_files("someone/Huge-GGUF", budget=10**18)
        choice = pick(listing, "q4_0", None)
        f = choice.files[0]
        d = q.wait(
            q.add("someone/Huge-GGUF", f, choice.sha256[f], choice.sizes[f], listing["commit"]).id,
            60,
        )
        assert d.state == "failed" and "not enough disk space" in (d.error or "")
        assert not list((tmp_path / "hub").rglob("*.lmx-partial"))
        assert scan_hf_cache(tmp_path / "hub") == []
    finally:
        q.close()
        del hub.repos["someone/Huge-GGUF"]  # the hub is shared: later searches must not see it


def test_downloads_send_the_users_hub_token(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Gated repositories need the token on the file requests too, not just on the listing."""
    monkeypatch.setenv("HF_TOKEN", "hf_test_token_123")
    q = queue_for(tmp_path)
    try:
        hub.auth.clear()
        d = q.wait(add(q, hub), 120)
        assert d.state == "done", d.error
        assert hub.auth and all(a == "Bearer hf_test_token_123" for a in hub.auth)
    finally:
        q.close()


def test_cli_pull_and_rm_go_through_a_running_server(
    hub: FakeHub, served: tuple[Any, Runtime], tmp_path: Path
) -> None:
    """With a server up, `lmx pull` joins its download queue (and shows the progress), and
    `lmx rm` removes from its cache: the CLI's own HF_HOME is never touched."""
    srv, rt = served
    env_home = tmp_path / "cli-home"
    r = subprocess.run(
        [sys.executable, "-m", "server.cli", "pull", f"{REPO}:Q4_1"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "LMX_HOST": srv.url, "HF_HOME": str(env_home / "hf")},
    )
    assert r.returncode == 0, r.stderr
    model = f"{REPO.lower()}/smollm2-135m-instruct-q4_1"
    assert r.stdout.strip() == f"pulled {model}" and "[####" in r.stderr
    jobs = httpx.get(srv.url + "/admin/downloads").json()["downloads"]
    assert [j["state"] for j in jobs] == ["done"]  # the server's queue did the work
    assert rt.catalog.resolve(model).source == "hf-cache" and not env_home.exists()
    r = subprocess.run(
        [sys.executable, "-m", "server.cli", "rm", model],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "LMX_HOST": srv.url},
    )
    assert r.returncode == 0, r.stderr
    assert model not in [m.id for m in rt.catalog.models()]
