"""The layers hold: server/ never imports the UI, nothing above engines/ names a concrete engine,
and every package server/ imports at run time is a declared dependency."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_server_never_imports_textual_in_a_fresh_interpreter() -> None:
    code = (
        "import sys, server.cli, server.runtime, server.pipeline, server.api.app, "
        "server.runner, server.client, server.engines.llamacpp, server.engines.mlx;"
        "bad = sorted(m for m in sys.modules if m == 'textual' or m.startswith('textual.') "
        "or m.startswith('lmx_tui'));"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


def test_import_linter_contracts() -> None:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert exe, "import-linter is in the dev group"
    out = subprocess.run([exe], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


def _imported_top_levels() -> set[str]:
    names: set[str] = set()
    for path in (ROOT / "server").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    return names


def test_every_runtime_import_is_a_declared_dependency() -> None:
    declared = {
        re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower().replace("_", "-")
        for r in importlib.metadata.requires("opta-lmx") or []
        if "extra ==" not in r
    }
    dists = importlib.metadata.packages_distributions()
    missing = []
    for mod in sorted(_imported_top_levels()):
        if mod in sys.stdlib_module_names or mod in ("server", "__future__"):
            continue
        owners = {d.lower().replace("_", "-") for d in dists.get(mod, [mod])}
        if not owners & declared:
            missing.append(f"{mod} ({', '.join(sorted(owners))})")
    assert not missing, f"imported by server/ but not declared: {missing}"
