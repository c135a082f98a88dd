"""server/ is the headless core: it must never import the UI."""

from __future__ import annotations

import subprocess
import sys


def test_server_never_imports_textual() -> None:
    code = (
        "import sys, server.cli, server.registry, server.api.app, server.runner, "
        "server.engines.llamacpp, server.engines.mlx;"
        "bad = sorted(m for m in sys.modules if m == 'textual' or m.startswith('textual.') "
        "or m.startswith('lmx_tui'));"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
