"""A stand-in for a reference recording: a voiced tone with a syllable-rate swell,
loud enough to pass the gateway's speech check, as samples or as a file's bytes."""

from __future__ import annotations

import io

import numpy as np
import soundfile


def speechlike(seconds: float = 2.0, rate: int = 16_000, level: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (level * np.sin(2 * np.pi * 180 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)


def recording(seconds: float = 2.0, rate: int = 24_000, level: float = 0.3, fmt: str = "WAV") -> bytes:
    out = io.BytesIO()
    soundfile.write(out, speechlike(seconds, rate, level), rate, format=fmt, subtype="PCM_16")
    return out.getvalue()
