"""A Riva SynthesizeSpeechRequest mapped onto SynthesisOptions, or INVALID_ARGUMENT
naming what Riva's API allows and this deployment does not (the servicer's docstring
lists the mapping for users).

Apart from the servicer so that the mapping can be read, and tested, as a table of
requests to options, with no call around it.
"""

from __future__ import annotations

import re

from chorus.proto.riva import riva_audio_pb2, riva_tts_pb2
from chorus.proto.tts.v1 import gateway_pb2
from chorus.speech.audio_formats import FORMATS
from gateway import validation, voice_aliases
from gateway.config import GatewayConfig
from gateway.errors import invalid
from gateway.request_types import SynthesisOptions
from gateway.sampling_fields import sampling_from_mapping

ENCODINGS = {
    riva_audio_pb2.ENCODING_UNSPECIFIED: "pcm",
    riva_audio_pb2.LINEAR_PCM: "pcm",
    riva_audio_pb2.FLAC: "flac",
    riva_audio_pb2.MULAW: "mulaw",
    riva_audio_pb2.ALAW: "alaw",
    riva_audio_pb2.OGGOPUS: "opus",
}
LANGUAGE = "en-US"
# "en" alone or with a BCP 47 region: two letters or three digits ("en-US", "en-419").
_ENGLISH = re.compile(r"en(-([a-z]{2}|[0-9]{3}))?", re.IGNORECASE)
# Rates Riva clients ask for that Opus cannot encode, and the Opus rate used instead.
OPUS_RATE_FOR = {12000: 16000, 22050: 24000, 44100: 48000}


def synthesis_options(
    request: riva_tts_pb2.SynthesizeSpeechRequest, config: GatewayConfig, time_remaining: float | None,
    cloned_voice: str = "",
) -> SynthesisOptions:
    """`cloned_voice`: the voice a request's zero_shot_data was registered as
    (frontends/riva/zero_shot.py), spoken instead of voice_name."""
    language = request.language_code
    if language and not _ENGLISH.fullmatch(language):
        raise invalid(f"language_code {language!r} is not spoken here; this deployment speaks English: "
                      f"use {LANGUAGE} (or en, or en- and a region such as en-GB), or leave it empty")
    if request.HasField("zero_shot_data") and not cloned_voice:
        raise invalid("zero_shot_data was not registered as a voice")  # the servicer registers it first
    if request.custom_dictionary:
        raise invalid("custom_dictionary is not supported: the backbone reads text, not phonemes")
    if request.enable_word_time_offsets:
        raise invalid("enable_word_time_offsets is not supported: the backbone gives no word timings")
    fmt_name = ENCODINGS.get(request.encoding)
    if fmt_name is None:
        raise invalid(f"encoding {request.encoding} is not supported; use LINEAR_PCM, FLAC, MULAW, ALAW or OGGOPUS")
    rate = request.sample_rate_hz
    if fmt_name == "opus":
        rate = OPUS_RATE_FOR.get(rate, rate)
    return validation.options(
        config,
        time_remaining,
        voice=cloned_voice or voice_aliases.resolve(request.voice_name, config),
        audio=gateway_pb2.AudioConfig(encoding=FORMATS[fmt_name].wire, sample_rate_hz=rate),
        sampling=sampling_from_mapping(dict(request.custom_configuration), "custom_configuration"),
        request_id=request.id.value if request.HasField("id") else "",
    )
