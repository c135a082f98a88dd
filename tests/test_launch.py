"""`lmx launch AGENT`: the agent's environment and config, the model loaded with the context
the agent needs (read back through the running server), and a refusal with its reason."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest

from server.launch import AGENTS, plan
from server.runner import ServerThread
from server.runtime import Runtime
from tests.conftest import make_config
from tests.recording_proxy import RecordingProxy
from tests.test_cli import lmx

SMOL = "smollm2-135m-instruct.q4_1"
AGENTS_CACHE = Path(os.environ.get("LMX_AGENTS_CACHE", Path.home() / ".cache" / "lmx-agents"))


@pytest.fixture
def cold() -> ServerThread:
    """A server of its own, nothing loaded: launch loads the model itself."""
    with ServerThread(Runtime(make_config(parallel=1, ctx=2048))) as srv:
        yield srv  # type: ignore[misc]


def _port(srv: ServerThread) -> str:
    return srv.url.rsplit(":", 1)[1]


def test_print_gives_each_agent_its_environment_and_loads_nothing(cold: ServerThread) -> None:
    r = lmx("launch", "aider", "--print", "--port", _port(cold))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert f"export OPENAI_API_BASE={cold.url}/v1" in out
    assert f"aider --model openai/{SMOL}" in out and '"max_input_tokens": 8192' in out
    assert f"/admin/models/{SMOL}/load?ctx=8192" in out
    r = lmx(
        "launch", "codex", "--print", "--ctx", "4096", "--port", _port(cold), "--", "exec", "hi"
    )
    assert r.returncode == 0, r.stderr
    assert 'model_providers.lmx.wire_api="responses"' in r.stdout
    assert "model_context_window=4096" in r.stdout and r.stdout.rstrip().endswith("exec hi")
    r = lmx("launch", "claude", "--print", "--ctx", "8192", "--port", _port(cold))
    assert r.returncode == 0, r.stderr
    assert f"export ANTHROPIC_BASE_URL={cold.url}\n" in r.stdout
    # The tuning knobs yield to the user's own values; the connection does not.
    assert (
        'export CLAUDE_CODE_MAX_OUTPUT_TOKENS="${CLAUDE_CODE_MAX_OUTPUT_TOKENS:-2048}"' in r.stdout
    )
    states = [m["state"] for m in httpx.get(cold.url + "/admin/models").json()["models"]]
    assert set(states) == {"available"}  # printing changed nothing


def test_the_users_own_agent_settings_win_over_lmx_tuning_but_not_over_the_connection(
    tmp_path: Path,
) -> None:
    p = plan(AGENTS["claude"], "http://127.0.0.1:1", "k", "m", 32768, tmp_path)
    mine = {"CLAUDE_CODE_MAX_OUTPUT_TOKENS": "1000", "ANTHROPIC_BASE_URL": "https://elsewhere"}
    env = p.environ(mine)
    assert env["CLAUDE_CODE_MAX_OUTPUT_TOKENS"] == "1000"
    assert env["CLAUDE_CODE_AUTO_COMPACT_WINDOW"] == "32768"
    assert env["ANTHROPIC_BASE_URL"] == "http://127.0.0.1:1"


def test_an_agent_needing_more_context_than_the_model_holds_is_refused_with_the_numbers(
    cold: ServerThread,
) -> None:
    r = lmx("launch", "claude", "--print", "--port", _port(cold))
    assert r.returncode == 2 and r.stdout == ""
    assert "holds 8192 tokens of context and claude needs 32768" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = lmx("launch", "nosuch", "--port", _port(cold))
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_a_load_with_a_context_reloads_the_model_with_it(cold: ServerThread) -> None:
    def ctx() -> int:
        [m] = [m for m in httpx.get(cold.url + "/admin/models").json()["models"] if m["id"] == SMOL]
        return int(m["ctx"])

    r = httpx.post(f"{cold.url}/admin/models/{SMOL}/load", timeout=120)
    assert r.status_code == 200 and '"ctx":2048' in r.text and ctx() == 2048
    r = httpx.post(f"{cold.url}/admin/models/{SMOL}/load", params={"ctx": 8192}, timeout=120)
    assert r.status_code == 200 and '"ctx":8192' in r.text and ctx() == 8192
    r = httpx.post(f"{cold.url}/admin/models/{SMOL}/load", params={"ctx": 1}, timeout=120)
    assert r.status_code == 400 and ctx() == 8192


def _aider() -> str | None:
    return shutil.which("aider", path=str(AGENTS_CACHE / "aider-venv" / "bin"))


@pytest.mark.slow
@pytest.mark.skipif(
    _aider() is None, reason=f"aider-chat not installed in {AGENTS_CACHE}/aider-venv"
)
def test_aider_finishes_a_turn_on_a_cold_lmx(cold: ServerThread, tmp_path: Path) -> None:
    """The real aider from PyPI, started by `lmx launch` with a throw-away HOME."""
    aider = _aider()
    assert aider is not None
    (tmp_path / ".aider.model.settings.yml").write_text(
        f"- name: openai/{SMOL}\n  extra_params:\n    max_tokens: 48\n"
    )
    env = {"HOME": str(tmp_path), "PATH": f"{Path(aider).parent}:{os.environ['PATH']}"}
    with RecordingProxy(cold.url) as proxy:
        r = lmx(
            "launch",
            "aider",
            "--port",
            str(proxy.port),
            "--",
            "--message",
            "Say hi.",
            "--yes-always",
            "--no-git",
            "--no-check-update",
            "--analytics-disable",
            env=env,
            cwd=tmp_path,
            timeout=600,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        chats = proxy.calls("/v1/chat/completions")
        assert chats and all(e.status == 200 and e.ended() for e in chats)
        assert all(e.status < 300 for e in proxy.exchanges)
        assert any(e.streamed for e in chats)  # aider streams by default
    assert f"loading {SMOL} with a context of 8192 tokens for aider" in r.stderr
