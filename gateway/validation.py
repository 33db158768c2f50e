"""Client requests checked and resolved into SynthesisOptions, or INVALID_ARGUMENT
naming the field, the bad value and what would be accepted.

Checked here, before any generation starts, so that a bad request costs no backbone
step and never fails halfway through a long text. The sampling ranges come from the
shared table (chorus/speech/limits.py), which the token server checks again.
"""

from __future__ import annotations

import secrets
import uuid

import grpc

from chorus.proto.tts.v1 import common_pb2, gateway_pb2
from chorus.speech.audio_formats import BY_WIRE, NATIVE_RATE, SAMPLE_RATES, AudioFormat
from gateway.config import GatewayConfig
from gateway.errors import GatewayError, invalid
from chorus.speech.limits import request_id_problem, sampling_problems
from chorus.speech.family import ORPHEUS
from chorus.speech.voice_store import NAME as VOICE_NAME
from chorus.speech.voice_store import VoiceNotFound, VoiceStore, VoiceStoreError
from chorus.speech.voices import unknown_voice
from gateway.request_types import GenerationSpec, SynthesisOptions
from gateway.segmenter import has_speech


def check_text(text: str, config: GatewayConfig) -> None:
    """A whole text for Synthesize."""
    if not text.strip():
        raise invalid("text is empty: put the words to speak in `text`")
    check_text_piece(text, config)
    if not has_speech(text):
        raise invalid("text has nothing to speak: it has no letters or digits")


def check_text_piece(text: str, config: GatewayConfig) -> None:
    """One message of text (a whole text, or a piece of a StreamingSynthesize call)."""
    if len(text) > config.max_text_chars:
        raise invalid(
            f"text is {len(text)} characters; this gateway takes at most {config.max_text_chars} in one message "
            "(GetLimits.max_text_chars): split it, or send it in pieces with StreamingSynthesize"
        )


def check_backlog(waiting_chars: int, config: GatewayConfig) -> None:
    """Text a StreamingSynthesize client sent ahead of the speech: bounded like one Synthesize text."""
    if waiting_chars > config.max_text_chars:
        raise GatewayError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"{waiting_chars} characters are waiting to be spoken, more than {config.max_text_chars}: "
            "send text about as fast as it is spoken (read the audio as it comes)",
        )


def synthesize_options(
    request: gateway_pb2.SynthesizeRequest, config: GatewayConfig, time_remaining: float | None
) -> SynthesisOptions:
    check_text(request.text, config)
    return options(
        config,
        time_remaining,
        voice=request.voice,
        audio=request.audio,
        sampling=request.sampling if request.HasField("sampling") else None,
        request_id=request.request_id,
    )


def streaming_options(
    first: gateway_pb2.StreamingSynthesizeRequest, config: GatewayConfig, time_remaining: float | None
) -> SynthesisOptions:
    if first.WhichOneof("payload") != "config":
        raise invalid(
            f"the first StreamingSynthesize message must carry `config`, got `{first.WhichOneof('payload')}`"
        )
    cfg = first.config
    return options(
        config,
        time_remaining,
        voice=cfg.voice,
        audio=cfg.audio,
        sampling=cfg.sampling if cfg.HasField("sampling") else None,
        request_id=cfg.request_id,
    )


def options(
    config: GatewayConfig,
    time_remaining: float | None,
    *,
    voice: str,
    audio: gateway_pb2.AudioConfig,
    sampling: common_pb2.SamplingParams | None,
    request_id: str,
    tempo: float = 1.0,
) -> SynthesisOptions:
    """Every front end's request in tts.v1's terms (the Riva and OpenAI ones map theirs first)."""
    voice = voice or config.default_voice
    family = voice_family(config, voice)
    fmt = BY_WIRE.get(audio.encoding)
    if fmt is None:
        raise invalid(f"unsupported audio encoding {audio.encoding}; GetLimits lists the encodings")
    rate = sample_rate(audio.sample_rate_hz, fmt)
    if sampling is not None:
        _check_sampling(sampling)
    sampling = _seeded(sampling)
    if (problem := request_id_problem(request_id)) is not None:
        raise invalid(problem)
    timeout = config.request_deadline_s if time_remaining is None else min(time_remaining, config.request_deadline_s)
    return SynthesisOptions(
        spec=GenerationSpec(request_id=request_id or uuid.uuid4().hex, voice=voice, sampling=sampling, family=family),
        format=fmt,
        sample_rate=rate,
        timeout_s=timeout,
        start_buffer_s=config.start_buffer_s,
        tempo=tempo,
    )


def voice_family(config: GatewayConfig, voice: str) -> str:
    """The model family that speaks `voice`: a fixed voice is Orpheus's, a voice of the
    store the family it was registered for; INVALID_ARGUMENT for any other name."""
    if voice in config.voices:
        return ORPHEUS
    if config.voice_store is not None and VOICE_NAME.fullmatch(voice):
        try:
            return VoiceStore(config.voice_store).family_of(voice)
        except VoiceNotFound:
            pass
        except VoiceStoreError as err:
            raise invalid(str(err)) from None
    raise invalid(unknown_voice(voice, config.voices) + (" or a voice registered from reference audio"
                                                           if config.voice_store is not None else ""))


def sample_rate(requested: int, fmt: AudioFormat, field: str = "sample_rate_hz") -> int:
    """The rate a request asked for (0: the native rate), if `fmt` takes it: one rule
    and one message for every door and every encoding, naming the door's own `field`."""
    rate = requested or NATIVE_RATE
    if rate not in SAMPLE_RATES:
        raise invalid(
            f"{field} {rate} is not supported; "
            f"use one of {', '.join(map(str, SAMPLE_RATES))} (0 keeps {NATIVE_RATE})"
        )
    if rate not in fmt.rates:
        raise invalid(
            f"{gateway_pb2.AudioEncoding.Name(fmt.wire)} does not support {rate} Hz; "
            f"use one of {', '.join(map(str, fmt.rates))}"
        )
    return rate


def _seeded(sampling: common_pb2.SamplingParams | None) -> common_pb2.SamplingParams:
    """The client's sampling with a seed drawn when it set none: the request's audio
    is then a function of the request (reported in the summary, so it can be
    replayed), and a token server that fails mid-stream can be replaced exactly."""
    seeded = common_pb2.SamplingParams()
    if sampling is not None:
        seeded.CopyFrom(sampling)
    if not seeded.HasField("seed"):
        seeded.seed = secrets.randbits(63)
    return seeded


def _check_sampling(sampling: common_pb2.SamplingParams) -> None:
    problems = sampling_problems(lambda name: getattr(sampling, name) if sampling.HasField(name) else None)
    if sampling.ignore_end_of_speech and not sampling.max_tokens:
        problems.append("ignore_end_of_speech needs max_tokens: it generates exactly that many tokens")
    if problems:
        raise invalid("; ".join(f"sampling.{p}" for p in problems))
