"""`POST /v1/audio/speech` bodies checked and mapped onto SynthesisOptions.

OpenAI's fields keep OpenAI's meaning: `voice` takes OpenAI's names (aliases of this
gateway's voices) as well as its own, `response_format` defaults to mp3, pcm is
24 kHz s16le, `speed` time-stretches within 0.25..4. Chorus adds two optional
fields: `sample_rate` (Hz) and `sampling` (tts.v1's SamplingParams as an object),
and accepts `instructions` without using it (the backbone takes no style prompt).
Unknown fields are refused, so a typo is not silently ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from chorus.audio_formats import FORMATS, NATIVE_RATE
from chorus.proto.tts.v1 import gateway_pb2
from gateway import validation, voice_aliases
from gateway.config import GatewayConfig
from gateway.encoding import MAX_TEMPO, MIN_TEMPO
from gateway.errors import invalid
from gateway.sampling_fields import sampling_from_mapping
from gateway.synthesis import SynthesisOptions

# OpenAI's formats only: mulaw and alaw (which tts.v1 and Riva take) are not
# documented for this door, so they are refused here rather than silently accepted.
OPENAI_FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")
STREAM_FORMATS = ("audio", "sse")
MAX_MODEL_CHARS = 256
_FIELDS = {"model", "input", "voice", "response_format", "speed", "stream_format", "instructions",
           "sample_rate", "sampling", "request_id"}


@dataclass(frozen=True)
class SpeechRequest:
    text: str
    options: SynthesisOptions
    sse: bool


def parse(body: object, config: GatewayConfig) -> SpeechRequest:
    if not isinstance(body, dict):
        raise invalid("the body must be a JSON object with at least `model` and `input`")
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise invalid(f"unknown field(s) {', '.join(unknown)}; the fields are {', '.join(sorted(_FIELDS))}")
    model = body.get("model")
    if not isinstance(model, str) or not model.strip() or len(model) > MAX_MODEL_CHARS:
        raise invalid("`model` is required: a name such as tts-1 (every name is served by this deployment's model)")
    text = _string(body, "input", required=True)
    validation.check_text(text, config)
    voice = voice_aliases.resolve(_string(body, "voice"), config)
    fmt_name = _string(body, "response_format") or "mp3"
    if fmt_name not in OPENAI_FORMATS:
        raise invalid(f"response_format {fmt_name!r} is not supported; use one of {', '.join(OPENAI_FORMATS)}")
    stream_format = _string(body, "stream_format") or "audio"
    if stream_format not in STREAM_FORMATS:
        raise invalid(f"stream_format {stream_format!r} is not supported; use audio or sse")
    _string(body, "instructions")
    speed = body.get("speed", 1.0)
    if isinstance(speed, bool) or not isinstance(speed, (int, float)) or not math.isfinite(speed) \
            or not MIN_TEMPO <= speed <= MAX_TEMPO:
        raise invalid(f"speed is {speed!r}; it must be a number from {MIN_TEMPO} to {MAX_TEMPO}")
    rate = body.get("sample_rate", NATIVE_RATE)
    if isinstance(rate, bool) or not isinstance(rate, int):
        raise invalid(f"sample_rate is {rate!r}; it must be a whole number of Hz")
    # Checked before it becomes an int32 proto field, which raises on 2**31 and past.
    rate = validation.sample_rate(rate, FORMATS[fmt_name], field="sample_rate")
    sampling = body.get("sampling")
    if sampling is not None and not isinstance(sampling, dict):
        raise invalid("sampling must be an object, e.g. {\"temperature\": 0.6, \"seed\": 7}")
    options = validation.options(
        config,
        None,
        voice=voice,
        audio=gateway_pb2.AudioConfig(encoding=FORMATS[fmt_name].wire, sample_rate_hz=rate),
        sampling=sampling_from_mapping(sampling or {}, "sampling"),
        request_id=_string(body, "request_id"),
        tempo=float(speed),
    )
    return SpeechRequest(text=text, options=options, sse=stream_format == "sse")


def _string(body: dict, name: str, required: bool = False) -> str:
    value = body.get(name)
    if value is None:
        if required:
            raise invalid(f"`{name}` is required")
        return ""
    if not isinstance(value, str):
        raise invalid(f"`{name}` must be a string, got {type(value).__name__}")
    return value
