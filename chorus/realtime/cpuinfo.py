"""The first CPU's fields in /proc/cpuinfo, read one way for every part that asks: the
wheel cache's key and `chorus doctor` (which instruction sets), MKL's numeric mode (which
vendor), the decoder's precision (native bf16 or not) and the image check's report.

Linux only; where the file cannot be read every field is "" and callers fall back to
their safe default. Nothing here starts torch or any native library, so it may run at
import time."""

from __future__ import annotations

import re
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


def field(name: str, text: str | None = None) -> str:
    """The first value of `name` (e.g. "model name", "vendor_id", "flags"), or ""."""
    if text is None:
        try:
            text = CPUINFO.read_text(errors="replace")
        except OSError:
            return ""
    match = re.search(rf"^{re.escape(name)}\s*:\s*(.*)$", text, re.MULTILINE)
    return match.group(1).strip() if match else ""
