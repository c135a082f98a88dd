"""Text from untrusted files (GGUF metadata, file names) made safe to show in a terminal.

A model's name or description may carry escape sequences that would repaint the screen, move
the cursor or set the window title when printed by `lmx ls`, the TUI or the log. They are
removed where such text enters lmx, so nothing downstream has to remember to.
"""

from __future__ import annotations

import re

# ESC-introduced sequences: CSI (ESC [ ... final), OSC/DCS/SOS/PM/APC strings up to their
# terminator (BEL or ESC \\), and two-byte escapes; then the 8-bit C1 forms of the same.
_SEQUENCES = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"
    r"|\x1b[\]PX^_].*?(?:\x07|\x1b\\|$)"
    r"|\x1b[ -/]*[0-~]"
    r"|\x9b[0-?]*[ -/]*[@-~]"
    r"|[\x90\x98\x9d\x9e\x9f].*?(?:\x07|\x9c|$)",
    re.DOTALL,
)
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0 but tab and newline; DEL; C1
_CONTROLS_ONE_LINE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: str, *, multiline: bool = False) -> str:
    """`text` without terminal escape sequences and control characters (tabs and newlines
    kept when `multiline`, as in a chat template)."""
    text = _SEQUENCES.sub("", text)
    return (_CONTROLS if multiline else _CONTROLS_ONE_LINE).sub("", text)
