"""The wheel cache: one folder per build key, holding the wheel and its build record.

A key names everything the build depends on (flavours.py), so a wheel from another
CPU, compiler or set of flags is never found under this machine's key. A wheel whose
smoke check died is deleted and its folder keeps only `rejected.json`, so the same
key never hands it out again, on this machine or on any other that shares the cache.

The build record is also written into the wheel (llama_cpp/lib/chorus-build.json),
so an installed library can say how it was built (`chorus doctor`, crash reports).
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

RECORD_NAME = "chorus-build.json"
RECORD_IN_WHEEL = f"llama_cpp/lib/{RECORD_NAME}"
REJECTED = "rejected.json"


@dataclass(frozen=True)
class Entry:
    key: str
    folder: Path

    @property
    def wheel(self) -> Path | None:
        wheels = sorted(self.folder.glob("llama_cpp_python-*.whl"))
        return wheels[0] if wheels else None

    @property
    def rejection(self) -> dict | None:
        return _read_json(self.folder / REJECTED)

    @property
    def record(self) -> dict | None:
        return _read_json(self.folder / RECORD_NAME)


def _read_json(path: Path) -> dict | None:
    """PATH's JSON, or None when it is missing or unreadable (a half-written file)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class WheelCache:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def entry(self, key: str) -> Entry:
        return Entry(key, self.root / key)

    def store(self, key: str, built_wheel: Path, record: dict) -> Entry:
        """Moves a freshly built wheel in, with RECORD embedded in it and beside it."""
        entry = self.entry(key)
        staging = self.root / f".{key}.{time.time_ns()}"
        staging.mkdir(parents=True)
        target = staging / built_wheel.name
        shutil.copy2(built_wheel, target)
        embed_record(target, record)
        (staging / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")
        if entry.folder.exists():
            shutil.rmtree(entry.folder)
        staging.rename(entry.folder)  # atomic: a half-written entry is never found
        return entry

    def reject(self, key: str, reason: dict) -> None:
        entry = self.entry(key)
        entry.folder.mkdir(parents=True, exist_ok=True)
        for wheel in entry.folder.glob("*.whl"):
            wheel.unlink()
        (entry.folder / REJECTED).write_text(json.dumps(reason, indent=2) + "\n")


def embed_record(wheel: Path, record: dict) -> None:
    """Adds RECORD_IN_WHEEL to a wheel and lists it in the wheel's RECORD file."""
    data = (json.dumps(record, indent=2) + "\n").encode()
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    rewritten = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(rewritten, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if item.filename == RECORD_IN_WHEEL:
                continue
            content = src.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                lines = [line for line in content.decode().splitlines() if not line.startswith(RECORD_IN_WHEEL + ",")]
                lines.append(f"{RECORD_IN_WHEEL},sha256={digest},{len(data)}")
                content = ("\n".join(lines) + "\n").encode()
            dst.writestr(item, content)
        dst.writestr(RECORD_IN_WHEEL, data)
    rewritten.replace(wheel)


def installed_record() -> dict | None:
    """The build record of the llama_cpp package on sys.path, found without importing it
    (importing loads the native library, which is what may crash)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("llama_cpp")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / "lib" / RECORD_NAME
        if path.is_file():
            return _read_json(path)
    return None
