"""`lmx launch AGENT`: the agent's environment and config, the model loaded with the context
the agent needs (read back through the running server), and a refusal with its reason."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import httpx
import pytest

from server.launch import AGENTS, plan
from server.runner import ServerThread
from server.runtime import Runtime
from tests.conftest import make_config, wait_for
from tests.recording_proxy import RecordingProxy
from tests.test_cli import LMX, lmx

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
    r = lmx(
        "launch",
        "opencode",
        "--print",
        "--ctx",
        "8192",
        "--max-output",
        "300",
        "--port",
        _port(cold),
    )
    assert r.returncode == 0, r.stderr
    assert '"output": 300' in r.stdout and '"context": 8192' in r.stdout
    r = lmx("launch", "aider", "--print", "--max-output", "0", "--port", _port(cold))
    assert r.returncode == 2 and "--max-output must be at least 1" in r.stderr
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


def test_a_preset_is_launched_under_its_own_id_on_its_base_model(tmp_path: Path) -> None:
    config = tmp_path / "lmx.toml"
    config.write_text(f'[presets.terse]\nmodel = "{SMOL}"\nmax_tokens = 64\n')
    with ServerThread(Runtime(make_config(config, parallel=1, ctx=2048))) as srv:
        est = httpx.get(srv.url + "/admin/estimate", params={"model": "terse"}).json()
        assert (est["model"], est["preset"], est["context_length"]) == (SMOL, "terse", 8192)
        r = lmx("launch", "aider", "--print", "--model", "terse", "--port", _port(srv))
        assert r.returncode == 0, r.stderr
        assert "aider --model openai/terse" in r.stdout and "/admin/models/terse/load" in r.stdout
        r = httpx.post(srv.url + "/admin/models/terse/load", params={"ctx": 4096}, timeout=120)
        assert r.status_code == 200 and f'"model":"{SMOL}"' in r.text and '"ctx":4096' in r.text


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


# ----- the npm agents, on Gemma 3 270M with the 32k context they need -----------------------

GEMMA = "gemma-3-270m"
AGENT_MODEL = "gemma-agent"  # a preset of Gemma: greedy, replies of a few lines
PROMPT = "Do not call any tool. Just answer with the word hi."
TURNS = 3  # answers to see through before an agent that goes on is stopped


def _npm_agent(name: str) -> str | None:
    return shutil.which(name, path=str(AGENTS_CACHE / "node_modules" / ".bin"))


@pytest.fixture
def gemma_cold(tmp_path_factory: pytest.TempPathFactory, gemma_path: Path) -> ServerThread:
    """A cold server whose model dir holds Gemma 3 270M (trained on 32k) beside the default."""
    folder = tmp_path_factory.mktemp("gemma-only")
    (folder / f"{GEMMA}.gguf").symlink_to(gemma_path.resolve())
    # Replies of a few lines: a 270M model given tools may call them until its budget ends.
    config = folder / "lmx.toml"
    preset = f'[presets.{AGENT_MODEL}]\nmodel = "{GEMMA}"\nmax_tokens = 400\ntemperature = 0\n'
    config.write_text(preset)
    with ServerThread(Runtime(make_config(config, model_dirs=[folder], parallel=1))) as srv:
        yield srv  # type: ignore[misc]


def _agent_turns(
    srv: ServerThread,
    agent: str,
    path: str,
    tmp_path: Path,
    *args: str,
    launch: tuple[str, ...] = (),
    **env: str,
) -> RecordingProxy:
    """`lmx launch AGENT --model gemma-agent -- ARGS` with a throw-away HOME, behind a
    recording proxy, until the agent exits or TURNS answers went through (a 270M model given
    an agent's tools may call them without end; the protocol is lmx's, the loop the model's).
    Then: an agent that exited did so with 0, every request got a 2xx, every whole stream
    ended with its terminal event, and every tool call lmx made came back as a tool result."""
    exe = _npm_agent(agent)
    assert exe is not None
    home = tmp_path / "home"
    home.mkdir()
    path_env = f"{Path(exe).parent}:{os.environ['PATH']}"
    with RecordingProxy(srv.url) as proxy:
        argv = [*LMX, "launch", agent, "--model", AGENT_MODEL, "--port", str(proxy.port), *launch]
        proc = subprocess.Popen(
            [*argv, "--", *args],
            # PWD too: OpenCode takes its working folder from it, not from the cwd.
            env={**os.environ, "HOME": str(home), "PATH": path_env, "PWD": str(tmp_path), **env},
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # lmx launch and the agent: one group to stop
        )
        try:
            wait_for(
                lambda: proc.poll() is not None or sum(e.done for e in proxy.calls(path)) >= TURNS,
                timeout=1500,
            )
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
            out, _ = proc.communicate(timeout=60)
        turns = [e for e in proxy.calls(path) if e.done]
        # An agent may give up on an answer cut at the preset's max_tokens (Codex does):
        # lmx said so in the dialect's words, and the loop was the model's.
        cut = bool(turns) and turns[-1].cut_by_length()
        assert proc.returncode == 0 or len(turns) >= TURNS or cut, out
        assert f"loading {AGENT_MODEL} with a context of 32768 tokens for {agent}" in out
        assert turns, [e.path for e in proxy.exchanges]
        assert all(e.status < 300 for e in proxy.exchanges), [
            (e.path, e.status, bytes(e.response[:300])) for e in proxy.exchanges if e.status >= 300
        ]
        assert all(e.ended() for e in turns), [e.events()[-3:] for e in turns if not e.ended()]
        assert not proxy.unanswered_tool_calls(path)
    return proxy


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.skipif(_npm_agent("codex") is None, reason=f"@openai/codex not in {AGENTS_CACHE}")
def test_codex_exec_runs_its_turns_on_a_cold_lmx(gemma_cold: ServerThread, tmp_path: Path) -> None:
    proxy = _agent_turns(
        gemma_cold,
        "codex",
        "/v1/responses",
        tmp_path,
        "exec",
        "--skip-git-repo-check",
        PROMPT,
    )
    assert all(e.streamed for e in proxy.calls("/v1/responses"))


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.skipif(_npm_agent("opencode") is None, reason=f"opencode-ai not in {AGENTS_CACHE}")
def test_opencode_run_runs_its_turns_on_a_cold_lmx(
    gemma_cold: ServerThread, tmp_path: Path
) -> None:
    # Its title request asks for its model's whole output limit: keep replies short.
    _agent_turns(
        gemma_cold,
        "opencode",
        "/v1/chat/completions",
        tmp_path,
        "run",
        PROMPT,
        launch=("--max-output", "256"),
    )


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.skipif(
    _npm_agent("claude") is None, reason=f"@anthropic-ai/claude-code not in {AGENTS_CACHE}"
)
def test_claude_print_runs_its_turns_on_a_cold_lmx(
    gemma_cold: ServerThread, tmp_path: Path
) -> None:
    proxy = _agent_turns(
        gemma_cold,
        "claude",
        "/v1/messages",
        tmp_path,
        "-p",
        PROMPT,
        "--tools",
        "Bash",
        CLAUDE_CODE_MAX_OUTPUT_TOKENS="256",  # the user's own value wins over lmx's
    )
    assert all(e.streamed for e in proxy.calls("/v1/messages"))
