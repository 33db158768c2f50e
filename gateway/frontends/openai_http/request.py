"""`POST /v1/audio/speech` bodies checked and mapped onto SynthesisOptions.

OpenAI's fields keep OpenAI's meaning: `voice` takes OpenAI's names (aliases of this
gateway's voices) as well as its own, as a string or as OpenAI's object
`{"id": name}`; `response_format` defaults to mp3, pcm is 24 kHz s16le, `speed`
time-stretches within 0.25..4. Chorus adds optional fields: `sample_rate` (Hz),
`sampling` (tts.v1's SamplingParams as an object) and `stream` (Kokoro's: false
asks for the whole file in one response, its length in the header), and accepts
`instructions` without using it (the backbone takes no style prompt).

Fields this door does not know are ignored with a warning in the log, not refused:
clients written for other servers send their own (Kokoro's `lang_code`, vLLM-Omni's
`language`, ...) and must still get speech. A known field with a value of the wrong
type is still a 400.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from chorus.proto.tts.v1 import gateway_pb2
from chorus.speech import neutts
from chorus.speech.audio_formats import FORMATS, NATIVE_RATE
from chorus.speech.family import ORPHEUS
from gateway import validation, voice_aliases
from gateway.config import GatewayConfig
from gateway.encoding import MAX_TEMPO, MIN_TEMPO
from gateway.errors import invalid
from gateway.request_types import SynthesisOptions
from gateway.sampling_fields import sampling_from_mapping

# OpenAI's formats only: mulaw and alaw (which tts.v1 and Riva take) are not
# documented for this door, so they are refused here rather than silently accepted.
OPENAI_FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")
STREAM_FORMATS = ("audio", "sse")
MAX_MODEL_CHARS = 256
# What `GET /v1/models` lists: OpenAI's speech models and the model families, the
# names clients offer in a model picker. `model` takes any name; a family's name asks
# for a voice of that family (the voice picks the family either way).
LISTED_MODELS = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts", ORPHEUS)
FAMILY_MODELS = (ORPHEUS, neutts.NAME)


def listed_models(config: GatewayConfig) -> tuple[str, ...]:
    """The model names to list: NeuTTS-Air's too where registered voices are served."""
    return LISTED_MODELS + ((neutts.NAME,) if config.voice_store is not None else ())
_FIELDS = {"model", "input", "voice", "response_format", "speed", "stream_format", "instructions",
           "sample_rate", "sampling", "request_id", "stream"}
# How much of the unknown field names the warning quotes: the names are the client's,
# and a 1 MiB body can hold many long ones.
_NAMES_LOGGED = 10
_NAME_CHARS = 40

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpeechRequest:
    text: str
    options: SynthesisOptions
    sse: bool
    # False: the whole file in one response (real lengths in WAV and FLAC headers).
    stream: bool = True


def parse(body: object, config: GatewayConfig) -> SpeechRequest:
    if not isinstance(body, dict):
        raise invalid("the body must be a JSON object with at least `model` and `input`")
    model = body.get("model")
    if not isinstance(model, str) or not model.strip() or len(model) > MAX_MODEL_CHARS:
        raise invalid("`model` is required: a name such as tts-1 (every name is served by this deployment's model)")
    text = _string(body, "input", required=True)
    validation.check_text(text, config)
    voice = voice_aliases.resolve(_voice(body), config)
    fmt_name = _string(body, "response_format") or "mp3"
    if fmt_name not in OPENAI_FORMATS:
        raise invalid(f"response_format {fmt_name!r} is not supported; use one of {', '.join(OPENAI_FORMATS)}")
    stream_format = _string(body, "stream_format") or "audio"
    if stream_format not in STREAM_FORMATS:
        raise invalid(f"stream_format {stream_format!r} is not supported; use audio or sse")
    stream = body.get("stream", True)
    if not isinstance(stream, bool):
        raise invalid(f"stream must be true (audio as it is made) or false (the whole file at once), "
                      f"got {type(stream).__name__}")
    if not stream and stream_format == "sse":
        raise invalid("stream is false but stream_format is sse, which is a stream of events: "
                      "drop one of them")
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
    if model in FAMILY_MODELS and options.spec.family != model:
        raise invalid(f"model {model} asks for a voice of the {model} family; {options.spec.voice!r} is of the "
                      f"{options.spec.family} family (GET /v1/audio/voices lists the voices)")
    _warn_unknown(body, options.spec.request_id)
    return SpeechRequest(text=text, options=options, sse=stream_format == "sse", stream=stream)


def _warn_unknown(body: dict, request_id: str) -> None:
    """One warning per request naming the fields it sent that this door ignores."""
    unknown = sorted(set(body) - _FIELDS)
    if not unknown:
        return
    names = ", ".join(repr(name[:_NAME_CHARS]) for name in unknown[:_NAMES_LOGGED])
    more = f" and {len(unknown) - _NAMES_LOGGED} more" if len(unknown) > _NAMES_LOGGED else ""
    log.warning("speech %s: ignoring field(s) this endpoint does not know: %s%s", request_id, names, more)


def _voice(body: dict) -> str:
    """`voice` as OpenAI documents it: a name, or an object {"id": name}."""
    value = body.get("voice")
    if isinstance(value, dict):
        if set(value) != {"id"} or not isinstance(value["id"], str):
            shape = "{" + ", ".join(f"{str(k)[:_NAME_CHARS]!r}: {type(v).__name__}" for k, v in value.items()) + "}"
            raise invalid(f"`voice` as an object must be {{\"id\": \"<voice name>\"}}, got {shape[:200]}")
        return value["id"]
    if value is not None and not isinstance(value, str):
        raise invalid(f"`voice` must be a voice name (a string such as alloy or tara) or an object "
                      f"{{\"id\": \"<voice name>\"}}, got {type(value).__name__}")
    return value or ""


def _string(body: dict, name: str, required: bool = False) -> str:
    value = body.get(name)
    if value is None:
        if required:
            raise invalid(f"`{name}` is required")
        return ""
    if not isinstance(value, str):
        raise invalid(f"`{name}` must be a string, got {type(value).__name__}")
    return value
