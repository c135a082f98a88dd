"""The `lmx` command. Without a command: the app (`lmx_tui` passes itself in as `run_app`);
`--no-ui` runs the server headless. `ls`, `run`, `pull`, `rm`, `ps` and `stop` talk to a
running lmx server when one answers (as Ollama's CLI does), and work in-process otherwise
(`ps` and `stop` need a server)."""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from server import __version__
from server.launch import AGENTS
from server.settings import (
    SETTINGS,
    ConfigError,
    ConfigStore,
    Settings,
    default_config_path,
)
from server.units import human_params, human_size

RunApp = Callable[[ConfigStore, bool], int | None]  # returns the exit status
# The app in a browser: (config, host, port, the argv each browser session's app runs with).
RunWeb = Callable[[ConfigStore, str, int, list[str]], None]
DEFAULT_WEB_PORT = 8422


class CliError(Exception):
    """A user mistake or an unreachable thing: printed as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """A bad command line is one line, as every other lmx error: the usage is one --help away."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# The settings each command reads. The server (`lmx`, `lmx --no-ui`) reads them all; a
# command that talks to a running server reads only how to reach it, plus what it does
# in-process when none answers.
_REACH = ("host", "port", "api_key", "admin_key", "tls_cert")
_FIND = ("model_dirs", "upstream")
_PLACE = (
    "ctx",
    "parallel",
    "threads",
    "gpu_layers",
    "main_gpu",
    "cache_type_k",
    "cache_type_v",
    "batch_invariant",
    "max_memory",
)
_REACH_HELP = {
    "host": "the running lmx server to talk to (default 127.0.0.1; LMX_HOST may be a URL)",
    "port": "its port (default 8421)",
    "api_key": "the key to send to it, when it needs one",
    "admin_key": "its admin key, sent instead of --api-key",
    "tls_cert": "its certificate: it serves HTTPS, and this certificate is trusted",
}


def _settings_flags(p: argparse.ArgumentParser, only: Sequence[str] | None = None) -> None:
    """The settings that have a flag, from the settings table: all of them, or `only` these
    (then host, port and the certificate are those of the server the command talks to)."""
    p.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="TOML config file (default: $LMX_CONFIG or ~/.config/lmx/config.toml)",
    )
    for s in SETTINGS:
        if s.flag is None or (only is not None and s.name not in only):
            continue
        help_text = _REACH_HELP.get(s.name, s.help) if only is not None else s.help
        kw: dict[str, Any] = {"dest": s.name, "help": help_text, "default": None}
        if s.kind == "paths":
            kw.update(action="append", metavar="DIR")
        elif s.kind == "strs":
            kw.update(action="append", metavar="ORIGIN")
        elif s.kind == "urls":
            kw.update(action="append", metavar="[NAME=]URL")
        elif s.kind == "bool":
            kw["action"] = argparse.BooleanOptionalAction  # --name / --no-name
        elif s.choices:
            kw["choices"] = s.choices
        else:
            kw["metavar"] = {
                "int": "N",
                "float": "N",
                "duration": "DURATION",
                "size": "SIZE",
                "path": "DIR" if s.name.endswith("_dir") else "FILE",
            }.get(s.kind, "VALUE")
        p.add_argument(s.flag, **kw)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="lmx",
        description="Local LLM server manager. Without a command: the terminal app and the "
        "API server together.",
    )
    parser.add_argument("--version", action="version", version=f"lmx {__version__}")
    parser.add_argument("--no-ui", action="store_true", help="run the API server headless")
    parser.add_argument(
        "--no-server", action="store_true", help="the app only, without the HTTP server"
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    parser.add_argument(
        "--web",
        action="store_true",
        help="serve the app in a browser (on --host, the same API key rules as the API)",
    )
    parser.add_argument(
        "--web-port",
        type=int,
        default=DEFAULT_WEB_PORT,
        metavar="N",
        help=f"the browser app's port (default {DEFAULT_WEB_PORT})",
    )
    _settings_flags(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    ls = sub.add_parser("ls", help="list available models")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.add_argument(
        "--estimate",
        action="store_true",
        help="memory each model needs (at --ctx/--parallel) and whether it fits",
    )
    _settings_flags(ls, (*_REACH, *_FIND, *_PLACE))
    ps = sub.add_parser("ps", help="models loaded by the running server")
    ps.add_argument("--json", action="store_true", help="machine-readable output")
    _settings_flags(ps, _REACH)
    stop = sub.add_parser("stop", help="unload a model from the running server")
    stop.add_argument("model")
    _settings_flags(stop, _REACH)
    se = sub.add_parser("search", help="search the Hugging Face hub for GGUF models")
    se.add_argument("text")
    se.add_argument("--sort", choices=["downloads", "likes"], default="downloads")
    se.add_argument("--files", metavar="REPO", help="list one repository's GGUF files instead")
    _settings_flags(se, ("max_memory",))
    pull = sub.add_parser("pull", help="download a model: REPO[:QUANT] (resumable, verified)")
    pull.add_argument("ref", metavar="REPO[:QUANT]")
    pull.add_argument("--file", help="a file of the repository instead of a quantization")
    _settings_flags(pull, (*_REACH, "max_memory"))
    rm = sub.add_parser("rm", help="delete a downloaded model (Hugging Face cache)")
    rm.add_argument("model")
    _settings_flags(rm, (*_REACH, "model_dirs"))
    run = sub.add_parser("run", help="answer one prompt with a model, streamed to stdout")
    run.add_argument("model", help="model id, unique prefix, alias, preset or 'default'")
    run.add_argument("prompt", help="the user message ('-' reads standard input)")
    run.add_argument("--system", help="system prompt")
    run.add_argument("--max-tokens", type=int, default=512)
    run.add_argument("--temperature", type=float, default=0.8)
    run.add_argument("--seed", type=int)
    _settings_flags(run, (*_REACH, *_FIND, *_PLACE))
    la = sub.add_parser(
        "launch",
        help="start a coding agent on lmx: claude, codex, opencode or aider",
        description="Start a coding agent against the running lmx (one is started for the "
        "session when none answers), with its base URL, key and model set, the model loaded "
        "with the context the agent needs, and nothing written over the agent's own config. "
        "Arguments after `--` go to the agent.",
    )
    la.add_argument("agent", choices=sorted(AGENTS), metavar="AGENT", help=", ".join(AGENTS))
    la.add_argument("--model", help="model id, unique prefix or alias (default: 'default')")
    la.add_argument(
        "--ctx",
        dest="agent_ctx",
        type=int,
        metavar="N",
        help="the context to load the model with (default: what the agent needs)",
    )
    la.add_argument(
        "--max-output",
        dest="agent_out",
        type=int,
        metavar="N",
        help="the longest reply the agent asks for (default: a quarter of the context, at most "
        "8192; Codex has no such setting)",
    )
    la.add_argument(
        "--print",
        action="store_true",
        help="print the environment, config and command instead of starting the agent",
    )
    _settings_flags(la, (*_REACH, *_FIND))
    return parser


def load_config(args: argparse.Namespace) -> ConfigStore:
    """Defaults < config file < LMX_* environment < flags."""
    cfg = args.config or default_config_path()
    flags = {s.name: getattr(args, s.name, None) for s in SETTINGS if s.flag}
    return ConfigStore(path=Path(cfg) if cfg else None, flags=flags)


def _fail(message: str) -> NoReturn:
    print(f"lmx: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def web_session_argv(argv: Sequence[str]) -> list[str]:
    """The command line of the app a browser session runs: this one without --web."""
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a == "--web" or a.startswith("--web-port="):
            continue
        elif a == "--web-port":
            skip = True
        else:
            out.append(a)
    return out


def main(
    argv: Sequence[str] | None = None,
    *,
    run_app: RunApp | None = None,
    run_web: RunWeb | None = None,
) -> None:
    """`lmx`. `run_app` opens the terminal app, `run_web` serves it to browsers (the console
    script passes lmx_tui's)."""
    from server.errors import LmxError

    argv = list(sys.argv[1:] if argv is None else argv)
    # `lmx launch AGENT ... -- ARGS`: what follows `--` is the agent's, never lmx's.
    cut = argv.index("--") if "--" in argv else len(argv)
    parser = build_parser()
    args = parser.parse_args(argv[:cut])
    args.agent_args = argv[cut + 1 :]
    if args.agent_args and args.command != "launch":
        parser.error(f"unrecognized arguments: {' '.join(argv[cut:])}")
    try:
        config = load_config(args)
        settings = config.current
        cmd = args.command
        if cmd in ("search", "pull"):
            # huggingface_hub retries a dropped connection and says so on stderr; lmx keeps the
            # retries and reports the outcome itself, in one line.
            from huggingface_hub.utils import logging as hf_logging

            hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
        if cmd == "ls":
            cmd_ls(settings, as_json=args.json, with_estimate=args.estimate, args=args)
        elif cmd == "ps":
            cmd_ps(settings, as_json=args.json)
        elif cmd == "stop":
            cmd_stop(settings, args.model)
        elif cmd == "run":
            cmd_run(config, args)
        elif cmd == "search":
            cmd_search(settings, args)
        elif cmd == "pull":
            cmd_pull(config, args)
        elif cmd == "rm":
            cmd_rm(config, args.model)
        elif cmd == "launch":
            from server import launch

            raise SystemExit(
                launch.run(config, args, launch.forward_flags(args, (*_REACH, *_FIND)))
            )
        elif args.no_ui:
            cmd_serve(config, args.log_level)
        elif args.web:
            if run_web is None:
                raise CliError("the browser app is not available here; use lmx --no-ui")
            refusal = settings.bind_refusal()
            if refusal:
                raise CliError(refusal)
            run_web(config, settings.host, args.web_port, web_session_argv(argv))
        elif run_app is not None:
            status = run_app(config, not args.no_server)
            if status:
                # The app crashed (its traceback is on the terminal): not a success.
                raise SystemExit(status)
        else:
            raise CliError("the terminal app is not available here; use lmx --no-ui")
    except LmxError as e:
        _fail(e.message)
    except (CliError, ConfigError, OSError) as e:
        _fail(str(e))
    except KeyboardInterrupt:
        raise SystemExit(130) from None


def _server(settings: Settings) -> Any:
    from server.client import find_server

    return find_server(settings)


def _table(rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


# ----- lmx ls / ps / stop ----------------------------------------------------------------------


def cmd_ls(
    settings: Settings, *, as_json: bool, with_estimate: bool, args: argparse.Namespace
) -> None:
    client = _server(settings)
    if client is not None:
        with client:
            models = client.models()
            if with_estimate and (args.ctx or args.parallel):
                for m in models:
                    if m.get("usable"):
                        est = client.get(
                            "/admin/estimate", model=m["id"], ctx=args.ctx, parallel=args.parallel
                        )
                        m["memory_estimate"], m["fits"] = est["estimate"], est["fits"]
                        m["fits_alone"] = est["fits_alone"]
            listing = client.get("/admin/models")
            budget = listing["budget_bytes"]
            budgets = listing.get("budgets") or {"ram": budget}
    else:
        from server.runtime import Runtime

        rt = Runtime(settings)
        try:
            models = rt.models.describe_all()
            memory = rt.models.memory()
            budget, budgets = memory["budget_bytes"], memory["budgets"]
        finally:
            rt.close()
    if as_json:
        keep = None if with_estimate else _DESCRIBE_KEYS
        print(json.dumps([_only(m, keep) for m in models], indent=2))
        return
    if with_estimate:
        _print_estimates(models, budget, budgets)
        return
    rows = [("ID", "ARCH", "PARAMS", "QUANT", "SIZE", "CTX", "SOURCE", "STATE")]
    notes = []
    for m in models:
        if m["usable"]:
            rows.append(
                (
                    m["id"],
                    m["architecture"] or "-",
                    human_params(m["parameters"]),
                    m["quantization"] or "-",
                    human_size(m["size_bytes"]),
                    str(m["context_length"] or "-"),
                    m["source"],
                    m.get("state", "available"),
                )
            )
        else:
            down = (m.get("upstream") or {}).get("reachable") is False
            state = "unreachable" if down else "unusable"
            rows.append(
                (m["id"], "-", "-", "-", human_size(m["size_bytes"]), "-", m["source"], state)
            )
            # An upstream's error names its URL already.
            why = m["error"] if down else f"unusable: {m['error']} ({m['path']})"
            notes.append(f"  {m['id']}: {why}")
        if m.get("template_error"):
            notes.append(f"  {m['id']}: chat template broken: {m['template_error']}")
    _table(rows)
    if notes:
        print("\n" + "\n".join(notes))


_DESCRIBE_KEYS = (
    "id",
    "path",
    "source",
    "format",
    "size_bytes",
    "usable",
    "error",
    "architecture",
    "parameters",
    "quantization",
    "context_length",
    "aliases",
    "upstream",
    "state",
    "template_error",
)


def _only(m: dict[str, Any], keys: tuple[str, ...] | None) -> dict[str, Any]:
    return m if keys is None else {k: m.get(k) for k in keys}


def _print_estimates(models: list[dict[str, Any]], budget: int, budgets: dict[str, int]) -> None:
    placed = [m for m in models if (m.get("memory_estimate") or {}).get("offload")]
    gpu = ("GPU",) if placed else ()
    rows = [("ID", "CTX", "SLOTS", "WEIGHTS", "KV CACHE", "COMPUTE", "TOTAL", *gpu, "FITS")]
    for m in models:
        est = m.get("memory_estimate")
        if not m["usable"] or not est:
            continue
        fits = m.get("fits_alone")
        if fits is None:
            fits = est["total"] <= budget
        rows.append(
            (
                m["id"],
                str(est["ctx"]),
                str(est["parallel"]),
                human_size(est["weights"]),
                human_size(est["kv_cache"]),
                human_size(est["compute"]),
                human_size(est["total"]),
                *((_gpu_cell(est),) if gpu else ()),
                "yes" if fits else "no",
            )
        )
    _table(rows)
    if placed:
        print()
        for m in placed:
            print(f"  {m['id']}: {m['memory_estimate']['offload']['note']}")
    gpus = [
        f"GPU {d.removeprefix('gpu')} {human_size(b)}" for d, b in budgets.items() if d != "ram"
    ]
    print(f"\nbudget {human_size(budget)} (--max-memory)" + "".join(f", {g}" for g in gpus))


def _gpu_cell(est: dict[str, Any]) -> str:
    """Offloaded layers and the VRAM they take: '18/31 1.2 GB'."""
    off = est.get("offload") or {}
    vram = sum(b for d, b in (est.get("devices") or {}).items() if d != "ram")
    layers = f"{off.get('gpu_layers', 0)}/{off.get('layers', '?')}"
    return f"{layers} {human_size(vram)}" if vram else layers


def _need_server(settings: Settings) -> Any:
    from server.client import base_url

    client = _server(settings)
    if client is None:
        raise CliError(
            f"no lmx server answers at {base_url(settings)}; start one with `lmx --no-ui` "
            "(or set LMX_HOST)"
        )
    return client


def cmd_ps(settings: Settings, *, as_json: bool) -> None:
    with _need_server(settings) as client:
        loaded = [m for m in client.models() if m.get("state") not in (None, "available")]
    if as_json:
        print(json.dumps(loaded, indent=2))
        return
    if not loaded:
        print("no models loaded")
        return
    rows = [("ID", "STATE", "MEMORY", "SLOTS", "QUEUE", "CTX", "UNLOADS IN")]
    for m in loaded:
        left = m.get("expires_in")
        until = "never (pinned)" if m.get("pinned") else ("never" if left is None else _ago(left))
        memory = m.get("memory_measured") or (m.get("memory_estimate") or {}).get("total", 0)
        rows.append(
            (
                m["id"],
                m["state"],
                human_size(memory),
                f"{m.get('slots_busy', 0)}/{m.get('slots', 0)} busy",
                str(m.get("queue_depth", 0)),
                str(m.get("ctx", "-")),
                until,
            )
        )
    _table(rows)


def _ago(seconds: float) -> str:
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def cmd_stop(settings: Settings, model: str) -> None:
    with _need_server(settings) as client:
        before = _loaded_ids(client)
        # Ollama's own way to unload: an empty generate with keep_alive 0. It names no model
        # id in a path, as ids with a slash (repo/file) would need.
        client.post("/api/generate", {"model": model, "keep_alive": 0})
        stopped = before - _loaded_ids(client)
    if not stopped:
        raise CliError(f"{model} is not loaded")
    print(f"stopped {', '.join(sorted(stopped))}")


def _loaded_ids(client: Any) -> set[str]:
    return {m["id"] for m in client.models() if m.get("state") not in (None, "available")}


# ----- lmx run -------------------------------------------------------------------------------


def cmd_run(config: ConfigStore, args: argparse.Namespace) -> None:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if args.max_tokens < 1:
        raise CliError("--max-tokens must be at least 1")
    if not 0 <= args.temperature <= 2:
        raise CliError("--temperature must be between 0 and 2")
    messages: list[dict[str, Any]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    messages.append({"role": "user", "content": prompt})
    client = _server(config.current)
    if client is not None:
        body: dict[str, Any] = {
            "model": args.model,
            "messages": messages,
            "max_tokens": args.max_tokens,
            "temperature": args.temperature,
            "stream_options": {"include_usage": True},
        }
        if args.seed is not None:
            body["seed"] = args.seed
        out = ReplyPrinter()
        with client:
            for kind, text in client.chat_stream(body):
                out.write(kind, text)
        out.end()
        return
    asyncio.run(_run_here(config, args, messages))


class ReplyPrinter:
    """`lmx run`'s output: the answer on stdout; a reasoning model's thinking on stderr,
    marked (and dimmed on a terminal), so that a pipe gets the answer alone."""

    def __init__(self) -> None:
        self.thinking = 0
        self.tokens: int | None = None  # the reply's length, when known
        self.answered = False
        self._in_thinking = False
        self._dim = sys.stderr.isatty()

    def write(self, kind: str, text: str) -> None:
        if kind == "usage":
            self.tokens = int(text)
            return
        if kind == "thinking":
            if not self._in_thinking:
                sys.stderr.write("\x1b[2m" if self._dim else "")
                sys.stderr.write("[thinking] ")
                self._in_thinking = True
            self.thinking += 1
            sys.stderr.write(text)
            sys.stderr.flush()
            return
        self._close_thinking()
        self.answered = True
        sys.stdout.write(text)
        sys.stdout.flush()

    def _close_thinking(self) -> None:
        if self._in_thinking:
            sys.stderr.write(("\x1b[0m" if self._dim else "") + "\n")
            sys.stderr.flush()
            self._in_thinking = False

    def end(self) -> None:
        self._close_thinking()
        sys.stdout.write("\n")
        if self.thinking and not self.answered:
            sys.stderr.write(
                f"lmx: no answer: all {self.tokens or self.thinking} tokens went to thinking; "
                "raise --max-tokens\n"
            )


async def _run_here(config: ConfigStore, args: argparse.Namespace, messages: Any) -> None:
    from server.pipeline import Delta, Done, GenerateRequest, Reasoning, Sampling
    from server.runtime import Runtime

    config.update(parallel=1)  # one prompt: one slot is all the memory it needs
    rt = Runtime(config)
    try:
        run = await rt.service.start(
            GenerateRequest(
                model=args.model,
                messages=messages,
                max_tokens=args.max_tokens,
                sampling=Sampling(temperature=args.temperature, seed=args.seed),
                label="cli",
                path="lmx run",
            )
        )
        out = ReplyPrinter()
        async for ev in run.events():
            if isinstance(ev, Delta):
                out.write("answer", ev.text)
            elif isinstance(ev, Reasoning):
                out.write("thinking", ev.text)
            elif isinstance(ev, Done):
                out.tokens = (out.tokens or 0) + ev.finished.completion_tokens
        out.end()
        if run.error:
            raise CliError(run.error)
    finally:
        await asyncio.to_thread(rt.close)


# ----- lmx search / pull / rm ------------------------------------------------------------------


def cmd_search(settings: Settings, args: argparse.Namespace) -> None:
    from server import hub
    from server.memory import default_budget

    try:
        if args.files:
            listing = hub.repo_files(args.files, settings.max_memory or default_budget())
            for f in listing["files"]:
                mark = "*" if f["name"] == listing["recommended"] else " "
                print(
                    f"{mark} {f['name']:<60} {f['quantization'] or '-':<8} "
                    f"{human_size(f['size']):>9}  {'fits' if f['fits'] else 'too big'}"
                )
            if listing["recommended"]:
                print(f"\n* recommended: lmx pull {args.files} --file {listing['recommended']}")
            return
        found = hub.search(args.text, sort=args.sort)
    except LookupError as e:
        raise CliError(str(e)) from e
    if not found:
        # As grep: no match is said, and is status 1 (an error is 2).
        print(f"lmx: no GGUF repositories match {args.text!r}", file=sys.stderr)
        raise SystemExit(1)
    for r in found:
        print(f"{r['id']:<60} {r['downloads']:>10} downloads {r['likes']:>6} likes")


def _progress(repo: str, jobs: list[dict[str, Any]]) -> None:
    done = sum(j["done"] for j in jobs)
    total = sum(j["size"] for j in jobs) or 1
    rate = sum(j.get("rate") or 0 for j in jobs)
    bar = "#" * int(30 * done / total)
    sys.stderr.write(
        f"\r{repo} [{bar:<30}] {human_size(done)} / {human_size(total)} "
        f"{human_size(int(rate))}/s   "
    )
    sys.stderr.flush()


def cmd_pull(config: ConfigStore, args: argparse.Namespace) -> None:
    repo, _, quant = args.ref.partition(":")
    client = _server(config.current)
    if client is not None:
        with client:
            jobs = client.post(
                "/admin/downloads", {"repo": repo, "quant": quant or None, "file": args.file}
            )["downloads"]
            ids = {j["id"] for j in jobs}
            while True:
                jobs = [j for j in client.get("/admin/downloads")["downloads"] if j["id"] in ids]
                _progress(repo, jobs)
                if all(j["state"] not in ("queued", "running") for j in jobs):
                    break
                time.sleep(0.5)  # a progress line twice a second
        sys.stderr.write("\n")
        bad = [j for j in jobs if j["state"] != "done"]
        if bad:
            raise CliError(bad[0]["error"] or f"download {bad[0]['state']}")
        print(f"pulled {repo}/{jobs[0]['filename'].removesuffix('.gguf')}".lower())
        return
    from server.runtime import Runtime

    rt = Runtime(config)
    try:
        pulled = rt.models.pull(repo, quant or None, args.file)
        while True:
            _progress(repo, [j.as_dict() for j in pulled])
            active = [j for j in pulled if j.state in ("queued", "running")]
            if not active:
                break
            rt.downloads.wait(active[0].id, 0.5)
        sys.stderr.write("\n")
        bad_jobs = [j for j in pulled if j.state != "done"]
        if bad_jobs:
            raise CliError(bad_jobs[0].error or f"download {bad_jobs[0].state}")
        rt.catalog.refresh()
        info = rt.catalog.resolve(f"{repo}/{pulled[0].filename.removesuffix('.gguf')}".lower())
        print(f"pulled {info.id}")
    finally:
        rt.close()


def cmd_rm(config: ConfigStore, model: str) -> None:
    client = _server(config.current)
    if client is not None:
        with client:
            client.delete("/api/delete", {"model": model})
        print(f"removed {model}")
        return
    from server.runtime import Runtime

    rt = Runtime(config)
    try:
        print(f"removed {rt.models.remove(model)}")
    finally:
        rt.close()


# ----- lmx --no-ui ---------------------------------------------------------------------------


def cmd_serve(config: ConfigStore, log_level: str) -> None:
    from server.runner import address, bind_socket, check_tls, make_server, scheme
    from server.runtime import Runtime

    settings = config.current
    refusal = settings.bind_refusal()
    if refusal:
        raise CliError(refusal)
    check_tls(settings)
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    # A native crash (a model library's) must not end the process silently: the Python stack
    # of every thread goes to the log (stderr here), and the exit status stays the signal's.
    faulthandler.enable(sys.stderr, all_threads=True)
    sock = bind_socket(settings.host, settings.port)
    try:
        rt = Runtime(config)
    except BaseException:
        sock.close()
        raise
    server = make_server(rt, log_level=log_level)
    host, port = address(sock)
    usable = [m for m in rt.catalog.models() if m.usable]

    def announce() -> None:
        print(
            f"lmx {__version__}: {len(usable)} models available; serving on "
            f"{scheme(settings)}://{host}:{port} (OpenAI API at /v1)",
            flush=True,
        )

    # SIGHUP re-reads the config; the reload runs on its own thread, never inside the handler
    # (which may interrupt the event loop while it holds a lock the reload needs).
    signal.signal(
        signal.SIGHUP,
        lambda *_: threading.Thread(target=rt.reload_config, name="lmx-sighup").start(),
    )
    rt.watch_config()

    def terminated(*_: Any) -> None:
        raise SystemExit(0)

    # uvicorn shuts down gracefully on SIGTERM, then raises it again under the handler that was
    # there before: this one, so the `finally` below still unloads the models and exits 0.
    signal.signal(signal.SIGTERM, terminated)
    server.on_started = announce  # only once the socket serves and every handler is in place
    try:
        server.run(sockets=[sock])
    finally:
        rt.close()
        sock.close()


if __name__ == "__main__":
    main()
