"""Cloning a voice from a recording, for every door alike.

tts.v1's RegisterVoice, the HTTP endpoint and Riva's zero-shot fields all end here,
so a voice is checked, encoded and stored by one rule. The cheap checks (a store is
configured, the family clones, the name is free, the transcript is usable) run before
the upload is decoded, and decoding runs before any token server is asked to encode:
a bad request costs the least work that can tell it is bad. The encoding is done by a
token server of the voice's family (which sends it to one of its codec workers), so
the gateway needs no codec address and the codes always match the codec that family
decodes. The voice is written to the shared store only whole, after encoding.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass

import grpc

from chorus.proto.tts.v1 import common_pb2, token_server_pb2
from chorus.speech import neutts
from chorus.speech.family import ORPHEUS
from chorus.speech.voice_store import (
    VoiceExists,
    VoiceNotFound,
    VoiceStore,
    VoiceStoreError,
    check_name,
    check_transcript,
)
from gateway.config import GatewayConfig, store_voice_description
from gateway.errors import GatewayError, invalid
from gateway.reference_audio import REFERENCE_RATE, ReferenceAudio, ReferenceAudioError, read_reference
from gateway.router import Router

# The families whose voices are cloned from a recording (the default, when a caller
# names none, first).
CLONING_FAMILIES = (neutts.NAME,)
# Riva's zero-shot requests carry their recording on every call; the voice it makes is
# named after the recording and transcript, so a repeated prompt is encoded once.
ZERO_SHOT_PREFIX = "zero-shot-"


@dataclass(frozen=True)
class Registered:
    name: str
    description: str
    reference_seconds: float
    frames: int


def cloning_family(family: str) -> str:
    """The family a registration asks for ("" is the default), or INVALID_ARGUMENT."""
    family = family or CLONING_FAMILIES[0]
    if family == ORPHEUS:
        raise invalid("orpheus speaks its fixed voices only and cannot clone one; register the voice for "
                      f"{' or '.join(CLONING_FAMILIES)}")
    if family not in CLONING_FAMILIES:
        raise invalid(f"family {family[:70]!r} is not one this gateway clones voices for; use "
                      f"{' or '.join(CLONING_FAMILIES)}")
    return family


def store_of(config: GatewayConfig) -> VoiceStore:
    if config.voice_store is None:
        raise GatewayError(grpc.StatusCode.FAILED_PRECONDITION,
                           "this gateway has no voice store, so it cannot register voices; start it with "
                           "--voice-store DIR (a directory every gateway and token server shares)")
    return VoiceStore(config.voice_store)


def deadline_of(config: GatewayConfig, time_remaining: float | None) -> float:
    """A registration's deadline (time.monotonic() based): the caller's, within the gateway's."""
    timeout = config.request_deadline_s if time_remaining is None else min(time_remaining, config.request_deadline_s)
    return time.monotonic() + timeout


async def register_voice(
    config: GatewayConfig, router: Router, name: str, transcript: str, audio: bytes, family: str,
    request_id: str, deadline: float,
) -> Registered:
    """Checks, encodes and stores a voice; a GatewayError says what is wrong."""
    store = store_of(config)
    family = cloning_family(family)
    try:
        check_name(name)
        transcript = check_transcript(transcript)
    except VoiceStoreError as err:
        raise invalid(str(err)) from None
    if name in config.voices:
        raise GatewayError(grpc.StatusCode.ALREADY_EXISTS,
                           f"{name!r} is a fixed voice of this deployment; choose another name")
    names = await asyncio.to_thread(store.names)
    if name in names:
        raise GatewayError(grpc.StatusCode.ALREADY_EXISTS,
                           f"a voice named {name!r} is already registered; delete it first to replace it")
    if len(names) >= config.max_voices:
        raise GatewayError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"the voice store holds {len(names)} voices, its limit (--max-voices); delete voices "
                           "no longer used (zero-shot- ones included) before registering more")
    try:
        reference = await asyncio.to_thread(read_reference, audio)
    except ReferenceAudioError as err:
        raise invalid(str(err)) from None
    codes = await _encode(router, reference, family, request_id, deadline)
    try:
        await asyncio.to_thread(store.register, name, family, transcript, reference.samples, REFERENCE_RATE,
                                {codes.codec: list(codes.codes)})
    except VoiceExists as err:  # registered by another call meanwhile: one of them wins
        raise GatewayError(grpc.StatusCode.ALREADY_EXISTS, str(err)) from None
    except VoiceStoreError as err:
        raise invalid(str(err)) from None
    except OSError as err:
        raise GatewayError(grpc.StatusCode.INTERNAL, f"the voice store could not be written ({err})") from None
    return Registered(name, store_voice_description(family), reference.seconds, len(codes.codes))


async def zero_shot_voice(
    config: GatewayConfig, router: Router, audio: bytes, transcript: str, request_id: str, deadline: float
) -> str:
    """The name of the voice a zero-shot prompt clones, registering it the first
    time that recording and transcript are seen."""
    # Megabytes of hashing: off the event loop, which every stream's relay shares.
    digest = await asyncio.to_thread(
        lambda: hashlib.sha256(len(audio).to_bytes(8, "little") + audio + transcript.strip().encode()).hexdigest())
    name = ZERO_SHOT_PREFIX + digest[:32]
    try:
        await register_voice(config, router, name, transcript, audio, "", request_id, deadline)
    except GatewayError as err:
        if err.code != grpc.StatusCode.ALREADY_EXISTS:
            raise
        await _check_readable(store_of(config), name)  # seen before: its description must still read
    return name


async def delete_voice(config: GatewayConfig, name: str) -> None:
    store = store_of(config)
    if name in config.voices:
        raise GatewayError(grpc.StatusCode.FAILED_PRECONDITION, f"{name!r} is a fixed voice and cannot be deleted")
    try:
        await asyncio.to_thread(store.remove, name)
    except VoiceNotFound as err:
        raise GatewayError(grpc.StatusCode.NOT_FOUND, str(err)) from None
    except VoiceStoreError as err:
        raise invalid(str(err)) from None


async def _encode(
    router: Router, reference: ReferenceAudio, family: str, request_id: str, deadline: float
) -> common_pb2.ReferenceCodes:
    # Building a message of up to 480,000 floats takes tens of milliseconds: off the event loop.
    request = await asyncio.to_thread(lambda: token_server_pb2.EncodeReferenceRequest(
        request_id=request_id,
        audio=common_pb2.ReferenceAudio(samples=reference.samples.tolist(), sample_rate_hz=REFERENCE_RATE),
    ))
    codes = await router.encode_reference(request, family, deadline)
    if not codes.codes or not codes.codec:
        raise GatewayError(grpc.StatusCode.INTERNAL, "the reference was encoded to no codes; nothing was stored")
    return codes


async def _check_readable(store: VoiceStore, name: str) -> None:
    """Its description only: the request is routed by it next, and the token server
    reads the codes itself (reading them here too was work done twice)."""
    try:
        await asyncio.to_thread(store.family_of, name)
    except VoiceStoreError as err:
        raise GatewayError(grpc.StatusCode.INTERNAL, str(err)) from None
