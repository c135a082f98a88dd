"""How sizes and counts read for people (CLI and TUI alike)."""

from __future__ import annotations


def human_size(n: int | None) -> str:
    """98362432 -> '98.4 MB' (decimal units, as disk tools show)."""
    if not n:
        return "-"
    x = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if x < 1000 or unit == "GB":
            return f"{x:.0f} {unit}" if unit in ("B", "KB") else f"{x:.1f} {unit}"
        x /= 1000
    return f"{x:.1f} TB"


def human_params(n: int | None) -> str:
    """134515008 -> '135M'."""
    if not n:
        return "-"
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"
