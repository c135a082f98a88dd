"""The `lmx` command: the TUI by default, `--no-ui` for a headless server, `ls` and `run`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from server import __version__
from server.settings import (
    ConfigError,
    Settings,
    default_config_path,
    parse_duration,
    parse_memory,
)
from server.units import human_params, human_size


class CliError(Exception):
    """A user mistake: printed as one line, exit status 2."""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="TOML config file (default: $LMX_CONFIG or ~/.config/lmx/config.toml)",
    )
    p.add_argument(
        "--model-dir",
        type=Path,
        action="append",
        default=None,
        metavar="DIR",
        help="folder searched recursively for GGUF models (repeatable)",
    )
    p.add_argument("--ctx", type=int, metavar="N", help="context length per slot (default 4096)")
    p.add_argument(
        "--parallel", type=int, metavar="N", help="requests decoded together per model (default 4)"
    )
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads per model")
    p.add_argument(
        "--gpu-layers",
        type=int,
        metavar="N",
        help="layers offloaded to the GPU (-1: all, the default)",
    )
    p.add_argument(
        "--max-memory",
        metavar="SIZE",
        help="memory budget for loaded models, e.g. 8G (default: 80%% of free RAM)",
    )
    p.add_argument(
        "--max-loaded-models",
        type=int,
        metavar="N",
        help="most models loaded at once (default: no limit but memory)",
    )
    p.add_argument(
        "--cache-type-k",
        choices=["f16", "q8_0", "q4_0"],
        help="KV cache type for keys (default f16; q8_0 halves the KV memory)",
    )
    p.add_argument(
        "--cache-type-v", choices=["f16", "q8_0", "q4_0"], help="KV cache type for values"
    )
    p.add_argument(
        "--prompt-cache-ram",
        metavar="SIZE",
        help="RAM for prompt prefixes kept beyond the slots and across model swaps "
        "(default: 25%% of the budget, at most 4G; 0: off); part of the memory budget",
    )
    p.add_argument(
        "--prompt-cache-disk",
        metavar="SIZE",
        help="disk for prompt prefixes spilled from RAM (default 4G; 0: RAM only)",
    )
    p.add_argument("--prompt-cache-dir", type=Path, metavar="DIR", help="where spilled prefixes go")
    p.add_argument(
        "--batch-invariant",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="temperature-0 text identical alone and batched (default on); off: "
        "llama-server's ubatch, faster long prefills",
    )
    p.add_argument(
        "--keep-alive",
        metavar="DURATION",
        help="unload a model this long after its last request: 5m (default), "
        "30s, 1h, 0 (at once), -1 (never)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmx",
        description="Local LLM server manager. Without a command: the terminal UI and the "
        "API server together.",
    )
    parser.add_argument("--version", action="version", version=f"lmx {__version__}")
    parser.add_argument("--no-ui", action="store_true", help="run the API server headless")
    parser.add_argument(
        "--no-server", action="store_true", help="TUI only, without the HTTP server"
    )
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (default 8421; 0: any)")
    parser.add_argument(
        "--api-key", help="require this key (Bearer) on every request (default: $LMX_API_KEY)"
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        metavar="N",
        help="requests that may wait per model before 429 (default 64)",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    _common(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    ls = sub.add_parser("ls", help="list available models")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.add_argument(
        "--estimate",
        action="store_true",
        help="memory each model needs (at --ctx/--parallel) and whether it fits",
    )
    _common(ls)
    se = sub.add_parser("search", help="search the Hugging Face hub for GGUF models")
    se.add_argument("text")
    se.add_argument("--sort", choices=["downloads", "likes"], default="downloads")
    se.add_argument("--files", metavar="REPO", help="list one repository's GGUF files instead")
    pull = sub.add_parser("pull", help="download a model: REPO[:QUANT] (resumable, verified)")
    pull.add_argument("ref", metavar="REPO[:QUANT]")
    pull.add_argument("--file", help="a file of the repository instead of a quantization")
    _common(pull)
    rm = sub.add_parser("rm", help="delete a downloaded model (Hugging Face cache)")
    rm.add_argument("model")
    _common(rm)
    run = sub.add_parser("run", help="answer one prompt with a model, streamed to stdout")
    run.add_argument("model", help="model id, unique prefix, or 'default'")
    run.add_argument("prompt", help="the user message ('-' reads standard input)")
    run.add_argument("--system", help="system prompt")
    run.add_argument("--max-tokens", type=int, default=512)
    run.add_argument("--temperature", type=float, default=0.8)
    run.add_argument("--seed", type=int)
    _common(run)
    return parser


def load_settings(args: argparse.Namespace) -> Settings:
    s = Settings()
    cfg = args.config or default_config_path()
    if cfg is not None:
        s.apply_file(Path(cfg))
    env_key = os.environ.get("LMX_API_KEY")
    if env_key:
        s.api_key = env_key
    for name in (
        "host",
        "port",
        "api_key",
        "ctx",
        "parallel",
        "threads",
        "gpu_layers",
        "max_queue",
        "cache_type_k",
        "cache_type_v",
        "batch_invariant",
        "prompt_cache_dir",
    ):
        v = getattr(args, name, None)
        if v is not None:
            setattr(s, name, v)
    if args.model_dir:
        s.model_dirs += [d.expanduser() for d in args.model_dir]
    try:
        if args.max_memory is not None:
            s.max_memory = parse_memory(args.max_memory)
        if args.keep_alive is not None:
            s.keep_alive = parse_duration(args.keep_alive)
        if args.prompt_cache_ram is not None:
            s.prompt_cache_ram = parse_memory(args.prompt_cache_ram)
        if args.prompt_cache_disk is not None:
            s.prompt_cache_disk = parse_memory(args.prompt_cache_disk)
    except ValueError as e:
        raise CliError(str(e)) from e
    if args.max_loaded_models is not None:
        s.max_loaded_models = args.max_loaded_models
    s.validate()
    return s


def _fail(message: str) -> NoReturn:
    print(f"lmx: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args)
        if args.command == "ls":
            cmd_ls(settings, as_json=args.json, with_estimate=args.estimate)
        elif args.command == "run":
            cmd_run(settings, args)
        elif args.command in ("search", "pull"):
            # huggingface_hub retries a dropped connection and says so on stderr; lmx keeps the
            # retries and reports the outcome itself, in one line.
            from huggingface_hub.utils import logging as hf_logging

            hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
            (cmd_search if args.command == "search" else cmd_pull)(settings, args)
        elif args.command == "rm":
            cmd_rm(settings, args.model)
        elif args.no_ui:
            cmd_serve(settings, args.log_level)
        else:
            from lmx_tui.app import run_tui

            run_tui(settings, serve=not args.no_server)
    except (CliError, ConfigError, OSError) as e:
        _fail(str(e))
    except KeyboardInterrupt:
        raise SystemExit(130) from None


# ----- lmx ls --------------------------------------------------------------------------------


def cmd_ls(settings: Settings, *, as_json: bool, with_estimate: bool = False) -> None:
    from server.api.admin import describe_model
    from server.registry import Registry

    registry = Registry(settings)
    models = registry.models()
    if as_json:
        out = [describe_model(registry, m) if with_estimate else m.describe() for m in models]
        print(json.dumps(out, indent=2))
        return
    if with_estimate:
        _print_estimates(registry)
        return
    rows = [("ID", "ARCH", "PARAMS", "QUANT", "SIZE", "CTX", "SOURCE")]
    notes = []
    for m in models:
        if m.usable:
            rows.append(
                (
                    m.id,
                    m.architecture or "-",
                    human_params(m.parameters),
                    m.quantization or "-",
                    human_size(m.size_bytes),
                    str(m.context_length or "-"),
                    m.source,
                )
            )
        else:
            rows.append((m.id, "-", "-", "-", human_size(m.size_bytes), "-", m.source))
            notes.append(f"  {m.id}: unusable: {m.error} ({m.path})")
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    if notes:
        print("\n" + "\n".join(notes))


def _print_estimates(registry: Any) -> None:
    rows = [("ID", "CTX", "SLOTS", "WEIGHTS", "KV CACHE", "COMPUTE", "TOTAL", "FITS")]
    for m in registry.models():
        if not m.usable:
            continue
        est = registry.estimate_for(m)
        rows.append(
            (
                m.id,
                str(est.ctx),
                str(est.parallel),
                human_size(est.weights),
                human_size(est.kv_cache),
                human_size(est.compute),
                human_size(est.total),
                "yes" if est.total <= registry.budget else "no",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    print(f"\nbudget {human_size(registry.budget)} (--max-memory)")


# ----- lmx run -------------------------------------------------------------------------------


def cmd_run(settings: Settings, args: argparse.Namespace) -> None:
    import queue as queue_mod

    from server.engines.base import Finished, GenerationRequest, SamplingParams
    from server.errors import LmxError
    from server.registry import Registry

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if args.max_tokens < 1:
        raise CliError("--max-tokens must be at least 1")
    if not 0 <= args.temperature <= 2:
        raise CliError("--temperature must be between 0 and 2")
    settings.parallel = 1
    registry = Registry(settings)
    try:
        lm = registry.ensure_loaded(args.model)
        messages: list[dict[str, Any]] = []
        if args.system:
            messages.append({"role": "system", "content": args.system})
        messages.append({"role": "user", "content": prompt})
        engine = lm.engine
        tokens = engine.format_chat(messages)
        room = engine.context_length - len(tokens)
        if room <= 0:
            raise CliError(
                f"the prompt has {len(tokens)} tokens; the context holds {engine.context_length}"
            )
        req = GenerationRequest(
            tokens,
            min(args.max_tokens, room),
            SamplingParams(temperature=args.temperature, seed=args.seed),
            label="cli",
        )
        q: queue_mod.Queue[Any] = queue_mod.Queue()
        gen = engine.submit(req, q.put)
        try:
            while True:
                ev = q.get()
                if isinstance(ev, Finished):
                    break
                sys.stdout.write(ev.text)
                sys.stdout.flush()
        except KeyboardInterrupt:
            gen.cancel()
            raise
        sys.stdout.write("\n")
        if ev.reason == "error":
            raise CliError(ev.error or "generation failed")
    except LmxError as e:
        raise CliError(e.message) from e
    finally:
        registry.close()


# ----- lmx search / pull / rm ------------------------------------------------------------------


def cmd_search(settings: Settings, args: argparse.Namespace) -> None:
    from server import hub
    from server.errors import LmxError
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
        for r in hub.search(args.text, sort=args.sort):
            print(f"{r['id']:<60} {r['downloads']:>10} downloads {r['likes']:>6} likes")
    except LookupError as e:
        raise CliError(str(e)) from e
    except LmxError as e:
        raise CliError(e.message) from e


def cmd_pull(settings: Settings, args: argparse.Namespace) -> None:
    from server.errors import LmxError
    from server.registry import Registry

    repo, _, quant = args.ref.partition(":")
    registry = Registry(settings)
    try:
        jobs = registry.pull(repo, quant or None, args.file)
        while True:
            done = sum(j.done for j in jobs)
            total = sum(j.size for j in jobs) or 1
            rate = sum(j.rate for j in jobs)
            bar = "#" * int(30 * done / total)
            sys.stderr.write(
                f"\r{repo} [{bar:<30}] {human_size(done)} / {human_size(total)} "
                f"{human_size(int(rate))}/s   "
            )
            sys.stderr.flush()
            if all(j.state not in ("queued", "running") for j in jobs):
                break
            registry.downloads.wait(
                jobs[0].id
                if jobs[0].state in ("queued", "running")
                else next(j.id for j in jobs if j.state in ("queued", "running")),
                0.5,
            )
        sys.stderr.write("\n")
        bad = [j for j in jobs if j.state != "done"]
        if bad:
            raise CliError(bad[0].error or f"download {bad[0].state}")
        registry.refresh()
        info = registry.resolve(f"{repo}/{jobs[0].filename.removesuffix('.gguf')}".lower())
        print(f"pulled {info.id}")
    except LmxError as e:
        raise CliError(e.message) from e
    finally:
        registry.downloads.close()
        registry.close()


def cmd_rm(settings: Settings, model: str) -> None:
    from server.errors import LmxError
    from server.registry import Registry

    registry = Registry(settings)
    try:
        print(f"removed {registry.remove(model)}")
    except LmxError as e:
        raise CliError(e.message) from e
    finally:
        registry.close()


# ----- lmx --no-ui ---------------------------------------------------------------------------


def cmd_serve(settings: Settings, log_level: str) -> None:
    from server.registry import Registry
    from server.runner import address, bind_socket, make_server

    refusal = settings.bind_refusal()
    if refusal:
        raise CliError(refusal)
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    sock = bind_socket(settings.host, settings.port)
    registry = Registry(settings)
    server = make_server(registry, settings, log_level=log_level)
    host, port = address(sock)
    usable = [m for m in registry.models() if m.usable]
    print(
        f"lmx {__version__}: {len(usable)} models available; serving on "
        f"http://{host}:{port} (OpenAI API at /v1)",
        flush=True,
    )
    if settings.config_path is not None:
        registry.watch_config()
        signal.signal(signal.SIGHUP, lambda *_: registry.try_reload())
    try:
        server.run(sockets=[sock])
    finally:
        registry.close()
        sock.close()


if __name__ == "__main__":
    main()
