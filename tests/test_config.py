"""Config-driven behaviour: aliases, pins, groups, presets, and reload without dropping work."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.errors import ModelsBusy
from server.registry import Registry, RegistryEvent
from server.runner import ServerThread
from server.settings import ConfigError, Settings
from tests.conftest import BackgroundStream, make_settings, wait_for

SMOL = "smollm2-135m-instruct.q4_1"


@pytest.fixture
def models_dir(tmp_path: Path, gemma_path: Path) -> Path:
    d = tmp_path / "models"
    d.mkdir()
    (d / "gemma.gguf").symlink_to(gemma_path.resolve())
    return d


def configured(tmp_path: Path, models_dir: Path, toml: str, **kw: Any) -> Registry:
    cfg = tmp_path / "lmx.toml"
    cfg.write_text(toml)
    s = make_settings(model_dirs=[models_dir], ctx=1024, parallel=2, **kw)
    s.apply_file(cfg)
    return Registry(s)


def test_aliases(tmp_path: Path, models_dir: Path) -> None:
    reg = configured(tmp_path, models_dir, f'[aliases]\nfast = "{SMOL}"\nbig = "gemma"\n')
    try:
        assert reg.resolve("fast").id == SMOL and reg.resolve("BIG").id == "gemma"
    finally:
        reg.close()


def test_pinned_models_are_never_evicted_nor_expire(tmp_path: Path, models_dir: Path) -> None:
    probe = configured(tmp_path, models_dir, "")
    budget = probe.estimate_for(probe.resolve("gemma")).total + 1_000_000
    probe.close()
    reg = configured(
        tmp_path,
        models_dir,
        f'[models."{SMOL}"]\npin = true\n',
        max_memory=budget,
        load_timeout=0.5,
        keep_alive=0.3,
    )
    try:
        reg.release(reg.acquire(SMOL))
        time.sleep(1.0)
        assert reg.get_loaded(SMOL) is not None  # pinned: keep_alive does not apply
        with pytest.raises(ModelsBusy):
            reg.ensure_loaded("gemma")  # the only model that could make room is pinned
        reg.settings.models.clear()
        reg.ensure_loaded("gemma")
        assert [lm.info.id for lm in reg.loaded()] == ["gemma"]
        reg.pin("gemma")  # pinned at run time (admin API, TUI)
        assert reg.is_pinned("gemma")
    finally:
        reg.close()


@pytest.mark.parametrize("exclusive", [True, False])
def test_exclusive_groups(tmp_path: Path, models_dir: Path, exclusive: bool) -> None:
    reg = configured(
        tmp_path,
        models_dir,
        (
            f'[groups.small]\nmembers = ["{SMOL}"]\nexclusive = {str(exclusive).lower()}\n'
            f'[groups.other]\nmembers = ["gemma"]\nexclusive = {str(exclusive).lower()}\n'
        ),
    )
    events: list[RegistryEvent] = []
    reg.subscribe(events.append)
    try:
        reg.ensure_loaded(SMOL)
        reg.ensure_loaded("gemma")  # plenty of memory: only the group rule can unload SMOL
        loaded = sorted(lm.info.id for lm in reg.loaded())
        if exclusive:
            assert loaded == ["gemma"]
            assert [e.model for e in events if e.kind == "evicted"] == [SMOL]
        else:
            assert loaded == ["gemma", SMOL]
    finally:
        reg.close()


def test_presets(tmp_path: Path, models_dir: Path) -> None:
    reg = configured(
        tmp_path,
        models_dir,
        (
            '[presets.pirate]\nmodel = "smollm2"\nsystem = "You are a pirate. Say arr."\n'
            "temperature = 0\nmax_tokens = 7\n"
        ),
    )
    try:
        with ServerThread(reg, reg.settings) as srv:
            ids = [m["id"] for m in httpx.get(srv.url + "/v1/models").json()["data"]]
            assert "pirate" in ids
            hi = [{"role": "user", "content": "Hello!"}]
            p = httpx.post(
                srv.url + "/v1/chat/completions",
                timeout=60,
                json={"model": "pirate", "messages": hi},
            ).json()
            base = httpx.post(
                srv.url + "/v1/chat/completions",
                timeout=60,
                json={
                    "model": SMOL,
                    "temperature": 0,
                    "max_tokens": 7,
                    "messages": [{"role": "system", "content": "You are a pirate. Say arr."}, *hi],
                },
            ).json()
            assert p["usage"]["completion_tokens"] == 7  # the preset's max_tokens
            assert p["usage"]["prompt_tokens"] == base["usage"]["prompt_tokens"]  # its system
            assert p["choices"][0]["message"] == base["choices"][0]["message"]  # its temp 0
    finally:
        reg.close()


def test_reload_on_file_change_keeps_requests_and_rejects_bad_files(
    tmp_path: Path, models_dir: Path
) -> None:
    reg = configured(tmp_path, models_dir, f'[aliases]\nfast = "{SMOL}"\n')
    cfg = reg.settings.config_path
    assert cfg is not None
    events: list[RegistryEvent] = []
    reg.subscribe(events.append)
    reg.watch_config(interval=0.1)
    try:
        with ServerThread(reg, reg.settings) as srv:
            stream = BackgroundStream(srv.url, "fast", 200)
            cfg.write_text(f'[aliases]\nfast = "{SMOL}"\nquick = "gemma"\n')
            wait_for(lambda: any(e.kind == "config_reloaded" for e in events), 10)
            assert reg.resolve("quick").id == "gemma"
            cfg.write_text('[aliases\nbroken = "x"\n')
            wait_for(lambda: any(e.kind == "config_error" for e in events), 10)
            err = next(e for e in events if e.kind == "config_error").detail["error"]
            assert "line 1" in err
            assert reg.resolve("quick").id == "gemma"  # the old config stays
            lines = stream.finish()
            assert lines[-1] == "data: [DONE]"
            assert any('"finish_reason":"length"' in line for line in lines)
    finally:
        reg.close()


def test_bad_config_values_name_the_line(tmp_path: Path) -> None:
    cfg = tmp_path / "lmx.toml"
    cfg.write_text('port = 9\n\n[groups.g]\nmembers = "not a list"\n')
    with pytest.raises(ConfigError, match=r"line 4"):
        Settings().apply_file(cfg)


def test_sighup_reloads_the_headless_server(tmp_path: Path) -> None:
    cfg = tmp_path / "lmx.toml"
    cfg.write_text("")
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "--no-ui", "--port", "0", "--config", str(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = re.search(r"(http://\S+)", proc.stdout.readline()).group(1)  # type: ignore[union-attr]
        threading.Thread(target=proc.stdout.read, daemon=True).start()
        cfg.write_text('[presets.helper]\nmodel = "default"\nsystem = "Be brief."\n')
        proc.send_signal(signal.SIGHUP)
        wait_for(
            lambda: "helper" in [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]], 10
        )
        assert proc.poll() is None  # still serving
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(10)
