"""The limits every service checks a request against: the legal ranges of the sampling
parameters, and bounds on the identifiers a request carries.

The gateway rejects bad values before any work starts, the token server checks again
(it is also called directly); both read these tables, so they cannot disagree.

A request id travels into logs, spans and downstream calls, so the gateway and the
token server bound it alike: a megabyte of id, or a newline that forges a log line,
stops at the first service that reads it.
"""

from __future__ import annotations

import math
from typing import Callable

from chorus.speech import orpheus

# --------------------------------------------------------------------------- request ids

MAX_REQUEST_ID_CHARS = 128
# The gateway names each piece of a long text "<id>.<index>"; the token server
# accepts that suffix on top of a client's longest id.
PIECE_SUFFIX_CHARS = 12


def request_id_problem(request_id: str, limit: int = MAX_REQUEST_ID_CHARS) -> str | None:
    """Why `request_id` is refused, or None."""
    if len(request_id) > limit:
        return f"request_id is {len(request_id)} characters; at most {limit}"
    if not request_id.isprintable():
        return "request_id has control characters (newlines, tabs, ...); use printable text"
    return None


# --------------------------------------------------------------------------- sampling

# field -> (lowest, highest, brackets ("[]" closed, "(]" open below, "[)" open above), note)
SAMPLING_RANGES = {
    "temperature": (0.0, 2.0, "[]", "0 is greedy"),
    "top_p": (0.0, 1.0, "(]", "the nucleus mass"),
    "top_k": (0, orpheus.CODEBOOK_SIZE, "[]", "0 disables it"),
    "min_p": (0.0, 1.0, "[)", "0 disables it"),
    "repetition_penalty": (0.5, 2.0, "[]", "1 disables it"),
    "max_tokens": (0, 2**31 - 1, "[]", "0 derives a budget from the text"),
}


def sampling_problems(value_of: Callable[[str], float | None]) -> list[str]:
    """What is out of range, one sentence each; `value_of(name)` is None for unset fields."""
    problems = []
    for name, (low, high, brackets, note) in SAMPLING_RANGES.items():
        value = value_of(name)
        if value is None:
            continue
        above = low <= value if brackets[0] == "[" else low < value
        below = value <= high if brackets[1] == "]" else value < high
        if not (above and below and math.isfinite(value)):
            interval = f"{brackets[0]}{low:g}, {high:g}{brackets[1]}"
            problems.append(f"{name} is {value:g}; it must be in {interval} ({note})")
    max_tokens = value_of("max_tokens")
    if max_tokens is not None and 0 < max_tokens < orpheus.CODES_PER_FRAME:
        problems.append(
            f"max_tokens is {max_tokens}; it must be 0 (a budget from the text) "
            f"or at least {orpheus.CODES_PER_FRAME} (one frame of audio)"
        )
    return problems


# --------------------------------------------------------------------------- reference audio

# A voice cloned from a recording: the gateway decodes and checks the upload, the codec
# worker checks again what reaches its encoder (it is also called directly). The
# reference encoder reads 16 kHz mono; the length bounds the encoder's work per voice.
REFERENCE_RATE = 16_000
MIN_REFERENCE_SECONDS = 1.0
MAX_REFERENCE_SECONDS = 30.0
# The largest upload read as a reference, in any container: 30 s of 48 kHz stereo
# 16-bit WAV is 5.8 MB; an uncompressed 96 kHz one would be cut off here.
MAX_REFERENCE_UPLOAD_BYTES = 16 * 1024 * 1024


def reference_problem(samples_count: int, sample_rate: int) -> str | None:
    """Why a reference of `samples_count` samples at `sample_rate` is refused, or None."""
    if sample_rate != REFERENCE_RATE:
        return f"the reference is at {sample_rate} Hz; send it at {REFERENCE_RATE} Hz mono"
    seconds = samples_count / REFERENCE_RATE
    if not MIN_REFERENCE_SECONDS <= seconds <= MAX_REFERENCE_SECONDS:
        return (f"the reference is {seconds:.2f} s long; send {MIN_REFERENCE_SECONDS:g}-"
                f"{MAX_REFERENCE_SECONDS:g} s of speech")
    return None


# The largest message that carries a reference on the way to its encoder (float32
# samples, packed), which token servers and codec workers read beside their own.
REFERENCE_MESSAGE_BYTES = 4 * int(MAX_REFERENCE_SECONDS * REFERENCE_RATE) + 64 * 1024
