"""Riva's SynthesizeSpeechRequest mapped onto Chorus's options, and the voice names
other APIs' clients send: tables of requests to what they become, or to the
INVALID_ARGUMENT that names what to send instead. No server: the mapping is a function.
"""

from __future__ import annotations

import dataclasses

import grpc
import numpy as np
import pytest

from chorus.proto.riva import riva_audio_pb2, riva_tts_pb2
from chorus.proto.riva.riva_common_pb2 import RequestId
from gateway import voice_aliases
from gateway.config import GatewayConfig
from gateway.errors import GatewayError
from gateway.frontends.riva.mapping import synthesis_options

CONFIG = GatewayConfig(token_servers=("127.0.0.1:1",))
# Two voices, one of each kind: the n-th Riva name of a kind must exist here.
FEW_VOICES = GatewayConfig(token_servers=("127.0.0.1:1",), voices=("leo", "mia"), default_voice="mia")


def request(**fields) -> riva_tts_pb2.SynthesizeSpeechRequest:
    return riva_tts_pb2.SynthesizeSpeechRequest(text="Hello.", **fields)


# (request fields, expected voice, format name, sample rate)
MAPPED = [
    ({}, "tara", "pcm", 24000),
    (dict(voice_name="leo"), "leo", "pcm", 24000),
    (dict(voice_name="English-US.Female-2"), "leah", "pcm", 24000),
    (dict(voice_name="english-us.male-3"), "zac", "pcm", 24000),
    (dict(voice_name="English-US-Male-1"), "leo", "pcm", 24000),  # older releases' spelling
    (dict(encoding=riva_audio_pb2.LINEAR_PCM, sample_rate_hz=22050), "tara", "pcm", 22050),
    (dict(encoding=riva_audio_pb2.FLAC, sample_rate_hz=16000), "tara", "flac", 16000),
    (dict(encoding=riva_audio_pb2.MULAW, sample_rate_hz=8000), "tara", "mulaw", 8000),
    (dict(encoding=riva_audio_pb2.ALAW, sample_rate_hz=8000), "tara", "alaw", 8000),
    (dict(encoding=riva_audio_pb2.OGGOPUS, sample_rate_hz=48000), "tara", "opus", 48000),
    # Rates Opus lacks, which Riva clients ask for, become Opus's nearest own rate.
    (dict(encoding=riva_audio_pb2.OGGOPUS, sample_rate_hz=22050), "tara", "opus", 24000),
    (dict(encoding=riva_audio_pb2.OGGOPUS, sample_rate_hz=44100), "tara", "opus", 48000),
    (dict(encoding=riva_audio_pb2.OGGOPUS, sample_rate_hz=12000), "tara", "opus", 16000),
    (dict(language_code="en-US"), "tara", "pcm", 24000),
    (dict(language_code="EN-gb"), "tara", "pcm", 24000),
    (dict(language_code="en"), "tara", "pcm", 24000),
    (dict(language_code="en-419"), "tara", "pcm", 24000),
]


@pytest.mark.parametrize("fields,voice,fmt,rate", MAPPED, ids=[repr(f) for f, *_ in MAPPED])
def test_riva_requests_map_onto_chorus_options(fields, voice, fmt, rate):
    options = synthesis_options(request(**fields), CONFIG, None)
    assert (options.spec.voice, options.format.name, options.sample_rate) == (voice, fmt, rate)


def test_riva_id_custom_configuration_and_deadline_carry_over():
    options = synthesis_options(
        request(id=RequestId(value="riva-42"), custom_configuration={"max_tokens": "70", "seed": "7"}), CONFIG, 3.5
    )
    assert options.spec.request_id == "riva-42"
    assert (options.spec.sampling.max_tokens, options.spec.sampling.seed) == (70, 7)
    assert options.timeout_s == 3.5


def test_riva_request_without_id_or_seed_gets_both():
    options = synthesis_options(request(), CONFIG, None)
    assert options.spec.request_id
    assert options.spec.sampling.HasField("seed")
    assert options.timeout_s == CONFIG.request_deadline_s


def test_a_zero_shot_request_speaks_the_voice_its_prompt_was_registered_as_instead_of_voice_name(tmp_path):
    from chorus.speech.voice_store import VoiceStore

    VoiceStore(tmp_path).register("zero-shot-ab12", "neutts-air", "Hi there.", np.zeros(16_000, np.float32), 16_000)
    config = dataclasses.replace(CONFIG, voice_store=tmp_path)
    message = _zero_shot(audio_prompt=b"RIFF", transcript="Hi there.")
    message.voice_name = "leo"
    assert synthesis_options(message, config, None, cloned_voice="zero-shot-ab12").spec.voice == "zero-shot-ab12"
    with pytest.raises(GatewayError):  # never spoken with voice_name when the prompt was not registered
        synthesis_options(message, config, None)


def _zero_shot(**fields) -> riva_tts_pb2.SynthesizeSpeechRequest:
    message = request()
    message.zero_shot_data.SetInParent()
    for name, value in fields.items():
        setattr(message.zero_shot_data, name, value)
    return message


REFUSED = [
    (request(language_code="fr-FR"), CONFIG, "language_code 'fr-FR' is not spoken here"),
    (request(language_code="english"), CONFIG, "language_code 'english'"),
    (request(language_code="enx"), CONFIG, "language_code 'enx'"),
    (request(custom_dictionary="tomato  T AH M EY T OW"), CONFIG, "custom_dictionary is not supported"),
    (request(enable_word_time_offsets=True), CONFIG, "enable_word_time_offsets is not supported"),
    (request(encoding=99), CONFIG, "encoding 99 is not supported"),
    (request(sample_rate_hz=1), CONFIG, "sample_rate_hz 1 is not supported"),
    (request(encoding=riva_audio_pb2.OGGOPUS, sample_rate_hz=192000), CONFIG, "sample_rate_hz 192000"),
    (request(voice_name="nobody"), CONFIG, "unknown voice 'nobody'"),
    (request(voice_name="Spanish-ES.Female-1"), CONFIG, "unknown voice 'Spanish-ES.Female-1'"),
    (request(voice_name="English-US.Female-2"), FEW_VOICES, "unknown voice 'English-US.Female-2'"),
    (request(custom_configuration={"temperatur": "0.5"}), CONFIG, "unknown key 'temperatur'"),
]


@pytest.mark.parametrize("message,config,problem", REFUSED, ids=[p for *_, p in REFUSED])
def test_riva_requests_chorus_cannot_serve_are_refused_with_a_reason(message, config, problem):
    with pytest.raises(GatewayError) as err:
        synthesis_options(message, config, None)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert problem in err.value.message


# --- voice_aliases --------------------------------------------------------------------

RESOLVED = [
    ("", CONFIG, ""),  # empty: validation takes the default voice
    ("leo", CONFIG, "leo"),
    ("alloy", CONFIG, "tara"),
    ("ALLOY", CONFIG, "tara"),
    ("onyx", CONFIG, "leo"),
    ("alloy", FEW_VOICES, "alloy"),  # its target is not configured: left for validation to refuse
    ("English-US.Female-1", FEW_VOICES, "mia"),  # the n-th configured voice of the kind
    ("English-US.Male-1", FEW_VOICES, "leo"),
    ("English-US.Male-2", FEW_VOICES, "English-US.Male-2"),
    ("nobody", CONFIG, "nobody"),
]


@pytest.mark.parametrize("name,config,voice", RESOLVED, ids=[f"{n!r}->{v!r}" for n, _, v in RESOLVED])
def test_alias_resolves_to_a_configured_voice_or_stays_as_sent(name, config, voice):
    assert voice_aliases.resolve(name, config) == voice


def test_riva_names_count_each_kind_in_configured_order():
    assert voice_aliases.riva_voice_names(CONFIG) == [
        ("English-US.Female-1", "tara"), ("English-US.Female-2", "leah"), ("English-US.Female-3", "jess"),
        ("English-US.Female-4", "mia"), ("English-US.Female-5", "zoe"),
        ("English-US.Male-1", "leo"), ("English-US.Male-2", "dan"), ("English-US.Male-3", "zac"),
    ]


def test_aliases_offer_only_names_whose_voice_is_configured():
    table = voice_aliases.aliases(FEW_VOICES)
    assert table == {
        "ash": "leo", "nova": "mia", "onyx": "leo",
        "English-US.Female-1": "mia", "English-US.Male-1": "leo",
    }
    assert all(voice_aliases.resolve(alias, FEW_VOICES) == voice for alias, voice in table.items())
