"""Registered voices, kept in one directory that every gateway and token server reads.

A voice cloned from reference audio must outlive the process that registered it and
be found by every replica of every tier, so it lives on disk (a volume in the chart),
not in memory: a folder per voice holding its description, the reference at 16 kHz
and its codes per codec. A voice appears whole or not at all: it is written into a
hidden folder and renamed into place, and two registrations of one name race on that
rename, which exactly one wins. Readers open what they are asked for each time
(a voice is a few hundred kilobytes), so a voice registered through one gateway is
there for every other at once. Arrays are read without pickle: a tampered store can
make a voice unreadable, never run code.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
MAX_TRANSCRIPT_CHARS = 2000
DESCRIPTION = "voice.json"
REFERENCE = "reference.npy"
_INCOMING = ".incoming-"


class VoiceStoreError(Exception):
    """A request the store refuses, or a voice on disk it cannot read; the message says which."""


class VoiceExists(VoiceStoreError):
    pass


class VoiceNotFound(VoiceStoreError):
    pass


@dataclass(frozen=True)
class StoredVoice:
    name: str
    family: str  # the model family whose prompts it goes in ("neutts-air", ...)
    transcript: str
    reference_rate: int
    reference: np.ndarray  # float32 mono
    codes: Mapping[str, np.ndarray] = field(default_factory=dict)  # codec name -> int codes
    registered_at: float = 0.0


def check_name(name: str, what: str = "voice name") -> str:
    if not NAME.fullmatch(name or ""):
        raise VoiceStoreError(f"{what} {(name or '')[:70]!r} is not allowed: use 1-64 lowercase letters, "
                              "digits, '-' or '_', starting with a letter or digit")
    return name


def check_transcript(text: str) -> str:
    text = (text or "").strip()
    if not text:
        raise VoiceStoreError("the reference's transcript is empty: send the words spoken in the reference audio")
    if len(text) > MAX_TRANSCRIPT_CHARS:
        raise VoiceStoreError(f"the reference's transcript is {len(text)} characters; at most "
                              f"{MAX_TRANSCRIPT_CHARS} (a reference is seconds of speech)")
    if any(ord(c) < 32 and c not in "\t\n\r" for c in text):
        raise VoiceStoreError("the reference's transcript holds control characters")
    return text


class VoiceStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def register(self, name: str, family: str, transcript: str, reference: np.ndarray, reference_rate: int,
                 codes: Mapping[str, np.ndarray] | None = None) -> StoredVoice:
        """Stores a new voice; VoiceExists when the name is taken (remove it first to replace it)."""
        voice = StoredVoice(
            name=check_name(name), family=family, transcript=check_transcript(transcript),
            reference_rate=int(reference_rate), reference=np.asarray(reference, dtype=np.float32).reshape(-1),
            codes={codec: np.asarray(c, dtype=np.int32) for codec, c in (codes or {}).items()},
            registered_at=time.time(),
        )
        for codec in voice.codes:
            check_name(codec, "codec name")
        self.root.mkdir(parents=True, exist_ok=True)
        target = self.root / voice.name
        if target.exists():
            raise VoiceExists(f"a voice named {voice.name!r} is already registered")
        incoming = Path(tempfile.mkdtemp(prefix=_INCOMING, dir=self.root))
        try:
            _write_array(incoming / REFERENCE, voice.reference)
            for codec, array in voice.codes.items():
                _write_array(incoming / f"codes-{codec}.npy", array)
            description = {"name": voice.name, "family": voice.family, "transcript": voice.transcript,
                           "reference_rate": voice.reference_rate, "codecs": sorted(voice.codes),
                           "registered_at": voice.registered_at}
            _write_bytes(incoming / DESCRIPTION, json.dumps(description, indent=1).encode())
            try:
                os.rename(incoming, target)  # a directory onto a name no one holds: atomic, one winner
            except OSError as err:
                raise VoiceExists(f"a voice named {voice.name!r} is already registered") from err
            _sync_dir(self.root)
        finally:
            shutil.rmtree(incoming, ignore_errors=True)
        return voice

    def family_of(self, name: str) -> str:
        """The family a voice was registered for, from its description alone (a
        gateway routes by it per request; the reference and codes are not read)."""
        folder, description = self._description(name)
        family = description.get("family")
        if not isinstance(family, str) or not family:
            raise VoiceStoreError(f"voice {name!r} cannot be read from {folder} (it names no model family)")
        return family

    def get(self, name: str, with_reference: bool = True) -> StoredVoice:
        """The voice; without its reference audio (an empty array) when a caller needs
        only the transcript and codes, as a prompt does on every request."""
        folder, description = self._description(name)
        try:
            return StoredVoice(
                name=description["name"], family=description["family"], transcript=description["transcript"],
                reference_rate=int(description["reference_rate"]),
                reference=_read_array(folder / REFERENCE) if with_reference else np.zeros(0, np.float32),
                codes={codec: _read_array(folder / f"codes-{check_name(codec, 'codec name')}.npy")
                       for codec in description["codecs"]},
                registered_at=float(description["registered_at"]),
            )
        except (KeyError, TypeError, OSError, ValueError, VoiceStoreError) as err:
            raise VoiceStoreError(f"voice {name!r} cannot be read from {folder} ({err})") from err

    def _description(self, name: str) -> tuple[Path, dict]:
        folder = self.root / check_name(name)
        try:
            description = json.loads((folder / DESCRIPTION).read_bytes())
        except FileNotFoundError:
            raise VoiceNotFound(f"no voice named {name!r} is registered") from None
        except (OSError, ValueError) as err:
            raise VoiceStoreError(f"voice {name!r} cannot be read from {folder} ({err})") from err
        if not isinstance(description, dict):
            raise VoiceStoreError(f"voice {name!r} cannot be read from {folder} (its description is not an object)")
        return folder, description

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if NAME.fullmatch(p.name) and (p / DESCRIPTION).is_file())

    def remove(self, name: str) -> None:
        folder = self.root / check_name(name)
        if not folder.is_dir():
            raise VoiceNotFound(f"no voice named {name!r} is registered")
        # Renamed away first, so that readers see the voice whole or gone, never half deleted.
        doomed = Path(tempfile.mkdtemp(prefix=_INCOMING, dir=self.root))
        try:
            os.rename(folder, doomed / name)
        except FileNotFoundError:
            raise VoiceNotFound(f"no voice named {name!r} is registered") from None
        finally:
            shutil.rmtree(doomed, ignore_errors=True)


def _write_array(path: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    _write_bytes(path, buffer.getvalue())


def _read_array(path: Path) -> np.ndarray:
    return np.load(path, allow_pickle=False)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

