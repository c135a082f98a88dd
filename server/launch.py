"""`lmx launch AGENT`: what each coding agent needs to run on lmx (as `ollama launch` does).

Each agent gets its base URL, key and model through its own environment variables and command
line flags, plus at most a config file of its own kind in a throw-away folder that the agent is
pointed at: nothing is written over the user's own agent config. The switches that keep the
agent's prompt cacheable (Claude Code's attribution header off) and the context lmx loads the
model with (so the agent compacts before it runs out) go with them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from server.errors import LmxError
from server.settings import SETTINGS_BY_NAME, ConfigStore, Settings

START_SECONDS = 180.0  # for a server started for the session to answer


@dataclass(frozen=True)
class Agent:
    name: str
    command: str  # the executable
    install: str  # how to get it
    ctx: int  # the context it needs: its system prompt and tools, and room for a few turns
    speaks: str  # the API it uses


AGENTS: dict[str, Agent] = {
    a.name: a
    for a in (
        # ~49 kB of system prompt and tool schemas per request (about 12-15k tokens).
        Agent(
            "claude",
            "claude",
            "npm install -g @anthropic-ai/claude-code",
            32768,
            "Anthropic Messages",
        ),
        # ~20 kB of instructions plus its tools and the whole input every turn.
        Agent("codex", "codex", "npm install -g @openai/codex", 32768, "Responses"),
        Agent("opencode", "opencode", "npm install -g opencode-ai", 32768, "chat completions"),
        # A repository map of about 1k tokens and its edit-format prompt.
        Agent("aider", "aider", "pip install aider-chat", 8192, "chat completions"),
    )
}


@dataclass
class Plan:
    """How to start one agent on lmx: its command line, the environment it adds, and the
    files it reads (paths in the session's throw-away folder)."""

    argv: list[str]
    env: dict[str, str]
    files: dict[Path, str] = field(default_factory=dict)
    # Tuning knobs: the user's own environment wins over these.
    defaults: dict[str, str] = field(default_factory=dict)

    def environ(self, base: Mapping[str, str]) -> dict[str, str]:
        """The agent's environment over `base` (the user's): lmx's defaults under it, the
        connection (base URL, key, model) over it."""
        return {**self.defaults, **base, **self.env}

    def shell(self, comment: str) -> str:
        """The plan as shell lines a user can paste (`lmx launch --print`)."""
        lines = [f"# {line}" for line in comment.splitlines()]
        for path, text in self.files.items():
            lines += [f"mkdir -p {shlex.quote(str(path.parent))}"]
            lines += [f"cat > {shlex.quote(str(path))} <<'EOF'", text.rstrip("\n"), "EOF"]
        lines += [f"export {k}={shlex.quote(v)}" for k, v in self.env.items()]
        lines += [f'export {k}="${{{k}:-{v}}}"' for k, v in self.defaults.items()]
        lines.append(shlex.join(self.argv))
        return "\n".join(lines) + "\n"


def output_tokens(ctx: int) -> int:
    """The reply length an agent may ask for: a quarter of the context, at most 8192."""
    return max(256, min(8192, ctx // 4))


def plan(
    agent: Agent,
    url: str,
    key: str,
    model: str,
    ctx: int,
    folder: Path,
    extra: Sequence[str] = (),
    max_output: int | None = None,
) -> Plan:
    """The plan for `agent` against the lmx at `url` (no /v1), using `model` with `ctx`;
    `max_output`: the reply length the agent asks for (None: `output_tokens(ctx)`)."""
    out = max_output or output_tokens(ctx)
    if agent.name == "claude":
        tuning = {
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "CLAUDE_CODE_AUTO_COMPACT_WINDOW": str(ctx),
            "CLAUDE_CODE_MAX_OUTPUT_TOKENS": str(out),
        }
        asked = {"CLAUDE_CODE_MAX_OUTPUT_TOKENS": str(out)} if max_output else {}
        return Plan(
            [agent.command, *extra],
            {
                "ANTHROPIC_BASE_URL": url,
                "ANTHROPIC_AUTH_TOKEN": key,
                "ANTHROPIC_API_KEY": "",  # never a real key of the user's to a local server
                "ANTHROPIC_MODEL": model,
                "ANTHROPIC_DEFAULT_OPUS_MODEL": model,
                "ANTHROPIC_DEFAULT_SONNET_MODEL": model,
                "ANTHROPIC_DEFAULT_HAIKU_MODEL": model,
                "ANTHROPIC_SMALL_FAST_MODEL": model,
                "CLAUDE_CODE_SUBAGENT_MODEL": model,
                # The attribution header changes on every request; lmx normalises it anyway,
                # and without it the first system block is the same bytes for every peer too.
                "CLAUDE_CODE_ATTRIBUTION_HEADER": "0",
                **asked,  # --max-output is asked for here and now: it wins
            },
            defaults={k: v for k, v in tuning.items() if k not in asked},
        )
    if agent.name == "codex":
        provider = {
            "name": "lmx",
            "base_url": f"{url}/v1",
            "wire_api": "responses",
            "env_key": "LMX_API_KEY",
            # A cold prefill of its first prompt on a CPU takes minutes, not seconds.
            "stream_idle_timeout_ms": 1_800_000,
        }
        overrides = [
            f"model={_toml(model)}",
            'model_provider="lmx"',
            *(f"model_providers.lmx.{k}={_toml(v)}" for k, v in provider.items()),
            f"model_context_window={ctx}",
            f"model_auto_compact_token_limit={ctx * 4 // 5}",
        ]
        flags = [x for o in overrides for x in ("-c", o)]
        return Plan([agent.command, *flags, *extra], {"LMX_API_KEY": key})
    if agent.name == "opencode":
        path = folder / "opencode.json"
        config = {
            "provider": {
                "lmx": {
                    "npm": "@ai-sdk/openai-compatible",
                    "name": "lmx",
                    "options": {"baseURL": f"{url}/v1", "apiKey": key},
                    "models": {model: {"name": model, "limit": {"context": ctx, "output": out}}},
                }
            },
            "model": f"lmx/{model}",
            "small_model": f"lmx/{model}",
            "share": "disabled",
            "autoupdate": False,
        }
        # OpenCode merges this file over the user's own config, which stays as it is.
        return Plan(
            [agent.command, *extra],
            {"OPENCODE_CONFIG": str(path)},
            {path: json.dumps(config, indent=2) + "\n"},
        )
    if agent.name == "aider":
        path = folder / "aider-models.json"
        name = f"openai/{model}"
        meta = {
            name: {
                "max_input_tokens": ctx,
                "max_output_tokens": out,
                "max_tokens": out,
                "input_cost_per_token": 0,
                "output_cost_per_token": 0,
                "litellm_provider": "openai",
                "mode": "chat",
            }
        }
        argv = [agent.command, "--model", name, "--weak-model", name]
        argv += ["--model-metadata-file", str(path), *extra]
        return Plan(
            argv,
            {"OPENAI_API_BASE": f"{url}/v1", "OPENAI_API_KEY": key},
            {path: json.dumps(meta, indent=2) + "\n"},
        )
    raise ValueError(f"unknown agent {agent.name!r}")


def _toml(v: object) -> str:
    """A TOML value for Codex's `-c key=value` (a JSON string is a TOML basic string)."""
    return json.dumps(v)


# ----- the session ---------------------------------------------------------------------------


class LaunchRefused(LmxError):
    """The agent cannot start: why, in one line."""


def run(config: ConfigStore, args: argparse.Namespace, forward: Sequence[str]) -> int:
    """`lmx launch`: the agent's exit status (or, with --print, 0 after printing its plan).
    `forward`: the settings flags a server started for the session gets."""
    from server.client import base_url, find_server

    settings = config.current
    agent = AGENTS[args.agent]
    exe = shutil.which(agent.command)
    if exe is None and not args.print:
        raise LaunchRefused(f"{agent.command} is not installed here (install it: {agent.install})")
    url = base_url(settings)
    key = settings.api_key or "lmx"
    want = args.agent_ctx or agent.ctx
    if args.agent_out is not None and args.agent_out < 1:
        raise LaunchRefused(f"--max-output must be at least 1; got {args.agent_out}")
    with contextlib.ExitStack() as stack:
        client = find_server(settings)
        if client is None and not args.print:
            client = stack.enter_context(_session_server(settings, forward, agent))
        model = args.model or "default"
        if client is not None:
            stack.callback(client.close)
            model = _model_for(client, agent, model, want, args.agent_ctx)
        if args.print:
            load = f"curl -X POST '{url}/admin/models/{quote(model, safe='')}/load?ctx={want}'"
            if settings.admin_key or settings.api_key:
                load += ' -H "Authorization: Bearer $LMX_ADMIN_KEY"'
            note = f"{agent.name} on lmx at {url}: {model}, context {want} ({agent.speaks}).\n"
            if client is None:
                note += "No lmx server answers there yet: start one (`lmx --no-ui`), then load "
            else:
                note += "Load "
            note += f"the model with that context:\n{load}"
            p = plan(
                agent, url, key, model, want, _print_folder(agent), args.agent_args, args.agent_out
            )
            print(p.shell(note), end="")
            return 0
        assert client is not None
        _say(f"loading {model} with a context of {want} tokens for {agent.name}")
        done = client.load(model, want)
        if done.get("ctx") not in (None, want):
            _say(
                f"{model} is busy with a context of {done['ctx']}: it reloads with {want} when "
                "its requests end"
            )
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lmx-launch-")))
        p = plan(agent, url, key, model, want, folder, args.agent_args, args.agent_out)
        for path, text in p.files.items():
            path.write_text(text, encoding="utf-8")
        _say(f"starting {agent.name} on {model} at {url}")
        # Ctrl-C is the agent's: lmx waits for it to end (a Python handler, unlike an ignored
        # signal, is not inherited by the agent).
        old = signal.signal(signal.SIGINT, lambda *_: None)
        try:
            return subprocess.call([exe or agent.command, *p.argv[1:]], env=p.environ(os.environ))
        finally:
            signal.signal(signal.SIGINT, old)


def _say(text: str) -> None:
    print(f"lmx: {text}", file=sys.stderr, flush=True)


def _print_folder(agent: Agent) -> Path:
    """Where the printed plan puts an agent's config file: lmx's own folder, not the agent's."""
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "lmx" / "agents" / agent.name


def _model_for(client: Any, agent: Agent, name: str, want: int, asked: int | None) -> str:
    """The model's id, once it is known to hold the agent's context and fit the budget."""
    est = client.get("/admin/estimate", model=name, ctx=want)
    model = str(est.get("preset") or est["model"])  # a preset runs on its base model
    trained = est.get("context_length")
    if asked is None and trained and trained < want:
        raise LaunchRefused(
            f"{model} holds {trained} tokens of context and {agent.name} needs {want}: choose "
            f"a model with a longer context (--model), or try it with --ctx {trained}"
        )
    if not est.get("fits_alone", True):
        options = "; ".join(o.get("text", "") for o in est.get("options") or [])
        raise LaunchRefused(
            f"{agent.name} needs a context of {want} tokens, and {est.get('reason')}"
            + (f" (what would fit: {options})" if options else "")
        )
    return model


@contextlib.contextmanager
def _session_server(settings: Settings, forward: Sequence[str], agent: Agent) -> Iterator[Any]:
    """A headless lmx for this session: started in the background, stopped when it ends."""
    from server.client import base_url, find_server

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmx"
    cache.mkdir(parents=True, exist_ok=True)
    log_path = cache / "launch-server.log"
    cmd = [sys.executable, "-m", "server.cli", "--no-ui", *forward]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C in the agent does not reach it
        )
    try:
        deadline = time.monotonic() + START_SECONDS
        while (client := find_server(settings)) is None:
            if proc.poll() is not None:
                raise LaunchRefused(f"the lmx server did not start: {_last_line(log_path)}")
            if time.monotonic() > deadline:
                raise LaunchRefused(f"the lmx server did not answer within {START_SECONDS:.0f} s")
            time.sleep(0.2)
        _say(
            f"started a server at {base_url(settings)} for this session (log: {log_path}); it "
            f"stops when {agent.name} exits"
        )
        yield client
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _last_line(path: Path) -> str:
    lines = [ln for ln in path.read_text("utf-8", "replace").splitlines() if ln.strip()]
    return lines[-1].strip() if lines else f"it exited without a word (see {path})"


def forward_flags(args: argparse.Namespace, names: Sequence[str]) -> list[str]:
    """The command line flags of these settings as given to `lmx launch`, for the server it
    starts (the server reads the same config file and LMX_* environment itself)."""
    out: list[str] = ["--config", str(args.config)] if args.config else []
    for name in names:
        v = getattr(args, name, None)
        s = SETTINGS_BY_NAME[name]
        if v is None or s.flag is None:
            continue
        if isinstance(v, bool):
            out.append(s.flag if v else "--no-" + s.flag.removeprefix("--"))
        elif isinstance(v, list):
            out += [x for item in v for x in (s.flag, str(item))]
        else:
            out += [s.flag, str(v)]
    return out
