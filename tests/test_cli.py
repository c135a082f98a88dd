"""The `lmx` command as a user runs it: a real subprocess, real signals, real ports."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import serving_url

LMX = [sys.executable, "-m", "server.cli"]
MODEL = "smollm2-135m-instruct.q4_1"


def lmx(
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 120,
    input: str | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LMX, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        input=input,
        cwd=cwd,
    )


def test_version() -> None:
    from server import __version__

    r = lmx("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"lmx {__version__}"


def test_ls_lists_the_default_model_with_its_facts() -> None:
    r = lmx("ls")
    assert r.returncode == 0, r.stderr
    header, row = r.stdout.splitlines()[:2]
    assert header.split() == ["ID", "ARCH", "PARAMS", "QUANT", "SIZE", "CTX", "SOURCE", "STATE"]
    assert row.split() == [
        MODEL,
        "llama",
        "135M",
        "Q4_1",
        "98.4",
        "MB",
        "8192",
        "default",
        "available",
    ]


def test_ls_shows_unusable_files_with_the_reason(tmp_path: Path) -> None:
    (tmp_path / "half.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 8)
    r = lmx("ls", "--model-dir", str(tmp_path))
    assert r.returncode == 0
    assert re.search(r"half: unusable: truncated", r.stdout), r.stdout


def test_ls_json(smollm2_path: Path) -> None:
    import json

    r = lmx("ls", "--json")
    data = json.loads(r.stdout)
    assert data[0]["id"] == MODEL and data[0]["path"] == str(smollm2_path)


def test_run_streams_an_answer() -> None:
    r = lmx("run", "default", "Say hello.", "--max-tokens", "8", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()


def test_run_reads_stdin() -> None:
    r = lmx("run", "smollm2", "-", "--max-tokens", "4", input="Say hello.")
    assert r.returncode == 0 and r.stdout.strip()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "no-such-model", "hi"], "no-such-model"),
        (["run", "default", "hi", "--max-tokens", "0"], "--max-tokens"),
        (["--no-ui", "--config", "/nonexistent/lmx.toml"], "cannot read config"),
        (["--no-ui", "--host", "0.0.0.0", "--port", "0"], "without an API key"),
        (["--no-ui", "--parallel", "0"], "parallel"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(args: list[str], message: str) -> None:
    r = lmx(*args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmx: error:") and message in lines[0], r.stderr


def test_a_bad_flag_is_one_line_not_the_usage(capsys: pytest.CaptureFixture[str]) -> None:
    from server.cli import main

    for argv in (["--bogus"], ["pull"], ["ls", "--nope"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and "error:" in lines[0] and "--help" in lines[0], lines


@pytest.mark.parametrize("command", ["pull", "rm", "run", "ps", "stop", "search", "ls"])
def test_a_commands_help_lists_only_the_flags_it_uses(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from server.cli import main

    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for server_only in ("--tls-key", "--cors-origin", "--api-key-file", "--key-max-tokens"):
        assert server_only not in text
    talks_to_a_server = command != "search"
    assert ("--host" in text) is talks_to_a_server
    assert ("--port" in text) is talks_to_a_server
    if talks_to_a_server:
        assert "address to listen on" not in text  # it is the server's address it talks to
    assert ("--ctx" in text) is (command in ("run", "ls"))


def test_bad_config_names_the_line(tmp_path: Path) -> None:
    cfg = tmp_path / "lmx.toml"
    cfg.write_text("port = 9000\n[models\nctx = 1\n")
    r = lmx("ls", "--config", str(cfg))
    assert r.returncode == 2 and "line 2" in r.stderr
    cfg.write_text("prot = 9000\n")
    r = lmx("ls", "--config", str(cfg))
    assert r.returncode == 2 and "prot" in r.stderr


def test_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = lmx("--no-ui", "--port", str(port))
    assert r.returncode == 2 and f"port {port}" in r.stderr and "in use" in r.stderr


class Served:
    def __init__(self, proc: subprocess.Popen[str], url: str) -> None:
        self.proc, self.url = proc, url


@contextlib.contextmanager
def serve(*args: str) -> Iterator[Served]:
    proc = subprocess.Popen(
        [*LMX, "--no-ui", "--port", "0", "--ctx", "2048", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    url = serving_url(proc.stdout)
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipe drained
    try:
        yield Served(proc, url)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_within_5s_with_streams_open(sig: signal.Signals) -> None:
    started = threading.Event()
    with serve() as srv:

        def long_stream(url: str = srv.url) -> None:
            body = {
                "model": MODEL,
                "stream": True,
                "max_tokens": 1900,
                "messages": [{"role": "user", "content": "Write a very long story."}],
            }
            try:
                with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
                    for _ in r.iter_lines():
                        started.set()
            except httpx.HTTPError:
                pass

        streams = [threading.Thread(target=long_stream) for _ in range(3)]
        for t in streams:
            t.start()
        assert started.wait(60), "no stream started"
        srv.proc.send_signal(sig)
        srv.proc.wait(timeout=10)  # open streams do not hold it up
        port = int(srv.url.rsplit(":", 1)[1])
        with socket.socket() as s:  # the port is free again
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
        for t in streams:
            t.join(10)
            assert not t.is_alive()


def test_api_key_is_required_when_set() -> None:
    import openai

    with serve("--api-key", "s3cret") as srv:
        r = httpx.get(srv.url + "/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(srv.url + "/health").status_code == 200
        bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
        assert good.models.list().data
        srv.proc.send_signal(signal.SIGINT)
        srv.proc.wait(10)


def test_non_loopback_with_key_is_allowed() -> None:
    with serve("--host", "0.0.0.0", "--api-key", "k") as srv:
        assert httpx.get(srv.url.replace("0.0.0.0", "127.0.0.1") + "/health").status_code == 200


# ----- the CLI as a client of a running server (as Ollama's is) -----------------------------------


def test_cli_talks_to_the_running_server() -> None:
    with serve() as srv:
        env = {"LMX_HOST": srv.url}
        r = lmx("ps", env=env)
        assert r.returncode == 0 and r.stdout.strip() == "no models loaded", r.stderr
        r = lmx("run", "default", "Say hello.", "--max-tokens", "6", "--temperature", "0", env=env)
        assert r.returncode == 0 and r.stdout.strip(), r.stderr
        # The server ran it: it holds the model now, and counted the request.
        ps = lmx("ps", env=env)
        assert ps.returncode == 0
        header, row = ps.stdout.splitlines()[:2]
        assert header.split()[:3] == ["ID", "STATE", "MEMORY"]
        assert row.startswith(MODEL) and "ready" in row and "0/4 busy" in row and "m" in row
        assert MODEL in httpx.get(srv.url + "/health").json()["models_loaded"]
        metrics = httpx.get(srv.url + "/metrics").text
        assert f'lmx_requests_total{{key="",model="{MODEL}",status="200"}} 1.0' in metrics
        ls = lmx("ls", env=env)
        assert ls.returncode == 0 and re.search(rf"{re.escape(MODEL)}\s.*\sready", ls.stdout)
        r = lmx("stop", "smollm2", env=env)
        assert r.returncode == 0 and r.stdout.strip() == f"stopped {MODEL}", r.stderr
        assert lmx("ps", env=env).stdout.strip() == "no models loaded"
        r = lmx("stop", "default", env=env)  # nothing to stop: says so, and fails
        assert r.returncode != 0 and not r.stdout
        assert r.stderr.strip() == "lmx: error: default is not loaded", r.stderr
        bad = lmx("run", "no-such-model", "hi", env=env)
        assert bad.returncode == 2 and "no-such-model" in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1


def test_run_in_process_when_no_server_answers() -> None:
    # conftest points LMX_HOST at a port where nothing listens
    r = lmx("run", "default", "Say hello.", "--max-tokens", "4")
    assert r.returncode == 0 and r.stdout.strip()
    for args in (["ps"], ["stop", "default"]):
        r = lmx(*args)
        assert r.returncode == 2 and "no lmx server answers at http://127.0.0.1:" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


def test_serving_line_comes_only_once_it_accepts_connections_and_handles_sighup() -> None:
    """A script that waits for the line and then at once connects or sends SIGHUP."""
    for _ in range(3):
        with serve() as srv:
            assert httpx.get(srv.url + "/health", timeout=5).status_code == 200
            srv.proc.send_signal(signal.SIGHUP)
            assert httpx.get(srv.url + "/health", timeout=5).status_code == 200
            assert srv.proc.poll() is None


def test_a_native_crash_exits_non_zero_with_every_threads_stack() -> None:
    """A SIGSEGV (what a model library's crash raises) is not silent: faulthandler writes
    the Python stack of each thread to the log (stderr under --no-ui), and the exit status is
    the signal's."""
    proc = subprocess.Popen(
        [*LMX, "--no-ui", "--port", "0", "--ctx", "2048"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    serving_url(proc.stdout)
    proc.send_signal(signal.SIGSEGV)
    rest = proc.stdout.read()
    assert proc.wait(timeout=30) == -signal.SIGSEGV
    assert "Fatal Python error: Segmentation fault" in rest
    assert "most recent call first" in rest and "server/cli.py" in rest, rest[-2000:]


def test_an_app_that_crashed_exits_non_zero() -> None:
    """The terminal app's crash (Textual prints the traceback) is a failure to the shell."""
    from server.cli import main

    with pytest.raises(SystemExit) as e:
        main([], run_app=lambda config, serve: 1)
    assert e.value.code == 1
    main([], run_app=lambda config, serve: 0)  # a normal quit returns


def test_run_with_a_thinking_model_says_where_the_tokens_went(
    tmp_path: Path, smollm2_path: Path
) -> None:
    """A template that opens `<think>`: SmolLM2 never closes it, so every token is thinking.
    `lmx run` prints the thinking on stderr, marked, and says that no answer came (it used to
    print an empty line)."""
    from tests.chat_templates import THINKING

    os.link(smollm2_path, tmp_path / "smollm2-think.gguf")
    config = tmp_path / "lmx.toml"
    config.write_text(f"[models.\"smollm2-think\"]\nchat_template = '''{THINKING}'''\n")
    r = lmx(
        "run",
        "smollm2-think",
        "Say hello.",
        "--max-tokens",
        "12",
        "--temperature",
        "0",
        "--config",
        str(config),
        "--model-dir",
        str(tmp_path),
    )
    assert r.returncode == 0, r.stderr
    assert "[thinking] " in r.stderr and r.stderr.split("[thinking] ", 1)[1].strip()
    assert "no answer: all 12 tokens went to thinking; raise --max-tokens" in r.stderr
    assert r.stdout == "\n"
