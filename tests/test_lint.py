"""The standing code checks run with the tests, so CI keeps them."""

from __future__ import annotations

import subprocess
import sys


def test_ruff() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "."],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy_strict_on_server() -> None:
    r = subprocess.run([sys.executable, "-m", "mypy"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
