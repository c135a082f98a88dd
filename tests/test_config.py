"""Config-driven behaviour: aliases, pins, groups, presets, and reload without dropping work."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.errors import ModelsBusy
from server.events import LmxEvent
from server.runner import ServerThread
from server.runtime import Runtime
from server.settings import SETTINGS, ConfigError, build_settings, read_config
from tests.conftest import BackgroundStream, load, make_config, serving_url, wait_for

SMOL = "smollm2-135m-instruct.q4_1"


@pytest.fixture
def models_dir(tmp_path: Path, gemma_path: Path) -> Path:
    d = tmp_path / "models"
    d.mkdir()
    (d / "gemma.gguf").symlink_to(gemma_path.resolve())
    return d


def configured(tmp_path: Path, models_dir: Path, toml: str, **kw: Any) -> Runtime:
    cfg = tmp_path / "lmx.toml"
    cfg.write_text(toml)
    return Runtime(make_config(cfg, model_dirs=[models_dir], ctx=1024, parallel=2, **kw))


def test_aliases(tmp_path: Path, models_dir: Path) -> None:
    reg = configured(tmp_path, models_dir, f'[aliases]\nfast = "{SMOL}"\nbig = "gemma"\n')
    try:
        assert reg.catalog.resolve("fast").id == SMOL and reg.catalog.resolve("BIG").id == "gemma"
    finally:
        reg.close()


def test_pinned_models_are_never_evicted_nor_expire(tmp_path: Path, models_dir: Path) -> None:
    probe = configured(tmp_path, models_dir, "")
    budget = probe.scheduler.estimate_for(probe.catalog.resolve("gemma")).total + 1_000_000
    probe.close()
    reg = configured(
        tmp_path,
        models_dir,
        f'[models."{SMOL}"]\npin = true\n',
        max_memory=budget,
        load_timeout=0.5,
        keep_alive=0,
    )
    try:
        reg.scheduler.lease(reg.catalog.resolve(SMOL)).release()
        # keep_alive 0 would unload at once; tick() is what the background loop runs.
        reg.scheduler.tick()
        assert reg.scheduler.get(SMOL) is not None  # pinned: keep_alive does not apply
        with pytest.raises(ModelsBusy, match=SMOL):
            load(reg, "gemma")  # the only model that could make room is pinned
        (tmp_path / "lmx.toml").write_text("")  # unpinned in the file
        assert reg.reload_config()
        load(reg, "gemma")
        assert [lm.info.id for lm in reg.scheduler.loaded()] == ["gemma"]
        reg.scheduler.pin("gemma")  # pinned at run time (admin API, TUI)
        assert reg.scheduler.is_pinned("gemma")
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
    events: list[LmxEvent] = []
    reg.events.subscribe(events.append)
    try:
        load(reg, SMOL)
        load(reg, "gemma")  # plenty of memory: only the group rule can unload SMOL
        loaded = sorted(lm.info.id for lm in reg.scheduler.loaded())
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
        with ServerThread(reg) as srv:
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
    events: list[LmxEvent] = []
    reg.events.subscribe(events.append)
    reg.watch_config(interval=0.1)
    try:
        with ServerThread(reg) as srv:
            stream = BackgroundStream(srv.url, "fast", 200)
            cfg.write_text(f'[aliases]\nfast = "{SMOL}"\nquick = "gemma"\n')
            wait_for(lambda: any(e.kind == "config_reloaded" for e in events), 10)
            assert reg.catalog.resolve("quick").id == "gemma"
            cfg.write_text('[aliases\nbroken = "x"\n')
            wait_for(lambda: any(e.kind == "config_error" for e in events), 10)
            err = next(e for e in events if e.kind == "config_error").detail["error"]
            assert "line 1" in err
            assert reg.catalog.resolve("quick").id == "gemma"  # the old config stays
            lines = stream.finish()
            assert lines[-1] == "data: [DONE]"
            assert any('"finish_reason":"length"' in line for line in lines)
    finally:
        reg.close()


def test_bad_config_values_name_the_line(tmp_path: Path) -> None:
    cfg = tmp_path / "lmx.toml"
    cfg.write_text('port = 9\n\n[groups.g]\nmembers = "not a list"\n')
    with pytest.raises(ConfigError, match=r"line 4"):
        read_config(cfg)
    cfg.write_text("ctx = 8\n")
    with pytest.raises(ConfigError, match=r"ctx 8 is below the minimum 64 \(line 1\)"):
        read_config(cfg)
    cfg.write_text('max_memory = "lots"\n')
    with pytest.raises(ConfigError, match=r"max_memory.*line 1"):
        read_config(cfg)
    cfg.write_text("colour = 3\n")
    with pytest.raises(ConfigError, match=r"unknown setting 'colour' \(line 1\)"):
        read_config(cfg)


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
        url = serving_url(proc.stdout)
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


# ----- one settings table: file, environment, flags ------------------------------------------


def test_file_environment_and_flags_feed_one_table(tmp_path: Path) -> None:
    cfg = tmp_path / "lmx.toml"
    cfg.write_text('ctx = 1024\nparallel = 3\nmax_memory = "2G"\nkeep_alive = "10m"\n')
    env = {"LMX_PARALLEL": "5", "LMX_LOAD_TIMEOUT": "7", "LMX_HOST": "127.0.0.2:9001"}
    s = build_settings(path=cfg, env=env, flags={"ctx": 2048, "max_memory": None})
    assert s.ctx == 2048  # flag over file
    assert s.parallel == 5  # environment over file
    assert s.max_memory == 2 * 10**9 and s.keep_alive == 600.0  # file over default
    assert s.load_timeout == 7.0 and (s.host, s.port) == ("127.0.0.2", 9001)
    with pytest.raises(ConfigError, match="LMX_PARALLEL: parallel 99 is above the maximum 64"):
        build_settings(env={"LMX_PARALLEL": "99"})


def test_every_setting_with_a_flag_is_in_the_help() -> None:
    from server.cli import build_parser

    text = build_parser().format_help()
    for s in SETTINGS:
        if s.flag:
            assert s.flag in text, s.flag


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    return tmp_path / "lmx.toml"


def test_memory_settings_in_the_file_are_obeyed(config_file: Path, models_dir: Path) -> None:
    """max_loaded_models, max_memory and load_timeout from the file, read back through the
    running server (they used to be parsed and ignored)."""
    config_file.write_text('max_loaded_models = 1\nmax_memory = "3G"\nload_timeout = 0\n')
    rt = Runtime(make_config(config_file, model_dirs=[models_dir], ctx=1024, parallel=2))
    try:
        with ServerThread(rt) as srv:
            models = httpx.get(srv.url + "/admin/models", timeout=30).json()
            assert models["budget_bytes"] == 3 * 10**9
            hi = [{"role": "user", "content": "hi"}]
            for name in (SMOL, "gemma"):
                r = httpx.post(
                    srv.url + "/v1/chat/completions",
                    timeout=120,
                    json={"model": name, "messages": hi, "max_tokens": 2},
                )
                assert r.status_code == 200, r.text
            assert [m["model"] for m in httpx.get(srv.url + "/api/ps").json()["models"]] == [
                "gemma:latest"
            ]
            # gemma is busy with a stream; load_timeout 0: SMOL gets 503 at once, not a wait
            stream = BackgroundStream(srv.url, "gemma", 400)
            r = httpx.post(
                srv.url + "/v1/chat/completions",
                timeout=120,
                json={"model": SMOL, "messages": hi, "max_tokens": 2},
            )
            assert r.status_code == 503 and r.json()["error"]["code"] == "models_busy"
            stream.finish()
    finally:
        rt.close()


def test_a_changed_ctx_reloads_the_model_when_idle(config_file: Path, models_dir: Path) -> None:
    config_file.write_text("")
    rt = Runtime(make_config(config_file, model_dirs=[models_dir], ctx=1024, parallel=2))
    events: list[LmxEvent] = []
    rt.events.subscribe(events.append)
    try:
        with ServerThread(rt) as srv:
            stream = BackgroundStream(srv.url, SMOL, 300)
            config_file.write_text(f'[models."{SMOL}"]\nctx = 512\n')
            assert rt.reload_config()
            lm = rt.scheduler.get(SMOL)
            assert lm is not None and lm.options.n_ctx == 1024  # busy: it keeps serving
            lines = stream.finish()
            assert lines[-1] == "data: [DONE]"
            wait_for(lambda: any(e.kind == "reconfigured" for e in events), 60)
            wait_for(lambda: rt.scheduler.get(SMOL) is not None, 60)
            new = rt.scheduler.get(SMOL)
            assert new is not None and new is not lm
            assert new.options.n_ctx == 512 and new.engine is not None
            assert new.engine.context_length == 512
    finally:
        rt.close()
