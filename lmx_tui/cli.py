"""The `lmx` console script: server.cli with the terminal app plugged in (server/ never
imports the app; the app hands itself to the CLI)."""

from __future__ import annotations

from collections.abc import Sequence

from server.cli import main as server_main
from server.settings import ConfigStore


def run_app(config: ConfigStore, serve: bool) -> int:
    from lmx_tui.app import run_tui

    return run_tui(config, serve=serve)


def run_web(config: ConfigStore, host: str, port: int, argv: list[str]) -> None:
    from lmx_tui.web import serve_web

    serve_web(config, host, port, argv)


def main(argv: Sequence[str] | None = None) -> None:
    server_main(argv, run_app=run_app, run_web=run_web)


if __name__ == "__main__":
    main()
