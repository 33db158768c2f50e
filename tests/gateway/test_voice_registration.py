"""Cloning a voice through each door: tts.v1's RegisterVoice and DeleteVoice, the HTTP
`POST/DELETE /v1/audio/voices`, and Riva's zero-shot fields. The gateway and its voice
store are real; the token servers are fakes that encode a reference to one code per
320 samples, so what reaches the store can be checked against what was sent."""

from __future__ import annotations

import base64
import contextlib
import io

import grpc
import httpx2 as httpx
import numpy as np
import pytest
import soundfile

from chorus.proto.riva import riva_audio_pb2, riva_tts_pb2, riva_tts_pb2_grpc
from chorus.proto.tts.v1 import gateway_pb2, gateway_pb2_grpc
from chorus.speech.voice_store import VoiceStore
from gateway.config import GatewayConfig
from gateway.server import start_server
from support.fake_token_server import FakeTokenService, run, token_server
from support.speechlike import recording

TRANSCRIPT = "Hello, this is my voice."


@contextlib.asynccontextmanager
async def gateway_with(store_root, *neutts_fakes, store=True, **config):
    orpheus = FakeTokenService()
    fakes = neutts_fakes or (FakeTokenService(family="neutts-air"),)
    async with contextlib.AsyncExitStack() as stack:
        addresses = [await stack.enter_async_context(token_server(f)) for f in (orpheus, *fakes)]
        running = await start_server(GatewayConfig(token_servers=tuple(addresses), http_port=0,
                                                   voice_store=store_root if store else None, **config), port=0)
        channel = grpc.aio.insecure_channel(running.address)
        try:
            async with httpx.AsyncClient(base_url=f"http://{running.endpoints['http']}", timeout=60) as http:
                yield fakes, gateway_pb2_grpc.SynthesisServiceStub(channel), channel, http
        finally:
            await channel.close()
            await running.stop(0)


async def speak(stub, voice: str) -> bytes:
    audio = b""
    async for message in stub.Synthesize(gateway_pb2.SynthesizeRequest(text="Hello there.", voice=voice), timeout=20):
        audio += message.audio.data
    return audio


def test_a_voice_registered_over_tts_v1_is_stored_listed_spoken_and_deleted(tmp_path):
    async def scenario():
        async with gateway_with(tmp_path / "voices") as ((neutts,), stub, _, _):
            reply = await stub.RegisterVoice(gateway_pb2.RegisterVoiceRequest(
                name="anna", audio=recording(), transcript=f"  {TRANSCRIPT}\n"), timeout=20)
            listed = await stub.ListVoices(gateway_pb2.ListVoicesRequest())
            await speak(stub, "anna")
            spoken_by = [r.voice for r in neutts.requests]
            await stub.DeleteVoice(gateway_pb2.DeleteVoiceRequest(name="anna"))
            with pytest.raises(grpc.aio.AioRpcError) as gone:
                await speak(stub, "anna")
            return reply, listed, spoken_by, neutts.encoded, gone.value

    reply, listed, spoken_by, encoded, gone = run(scenario())
    assert reply.voice.name == "anna" and reply.voice.description == "registered from reference audio (neutts-air)"
    assert reply.reference_seconds == pytest.approx(2.0, abs=1e-3)
    # The fake's codes: one per 320 samples of the 16 kHz reference the gateway sent.
    assert len(encoded) == 1 and encoded[0].audio.sample_rate_hz == 16_000
    assert len(encoded[0].audio.samples) == 32_000 and reply.reference_frames == 100
    assert "anna" in [v.name for v in listed.voices] and spoken_by == ["anna"]
    assert gone.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown voice 'anna'" in gone.details()
    assert VoiceStore(tmp_path / "voices").names() == []


def test_the_stored_voice_holds_the_encoders_codes_the_transcript_and_the_16khz_reference(tmp_path):
    async def scenario():
        async with gateway_with(tmp_path / "voices") as ((neutts,), stub, _, _):
            await stub.RegisterVoice(gateway_pb2.RegisterVoiceRequest(
                name="anna", audio=recording(rate=48_000), transcript=TRANSCRIPT, family="neutts-air"), timeout=20)
            return neutts.encoded[0]

    sent = run(scenario())
    voice = VoiceStore(tmp_path / "voices").get("anna")
    assert (voice.family, voice.transcript, voice.reference_rate) == ("neutts-air", TRANSCRIPT, 16_000)
    np.testing.assert_array_equal(voice.reference, np.asarray(sent.audio.samples, np.float32))
    expected = (np.abs(voice.reference.reshape(-1, 320)).mean(axis=1) * 65535).astype(np.int32)
    np.testing.assert_array_equal(voice.codes["neucodec_24khz"], expected)


BAD = {
    "name": (dict(name="Anna!"), grpc.StatusCode.INVALID_ARGUMENT, "is not allowed"),
    "fixed": (dict(name="tara"), grpc.StatusCode.ALREADY_EXISTS, "is a fixed voice"),
    "orpheus": (dict(family="orpheus"), grpc.StatusCode.INVALID_ARGUMENT, "fixed voices only"),
    "family": (dict(family="kokoro"), grpc.StatusCode.INVALID_ARGUMENT, "not one this gateway clones"),
    "transcript": (dict(transcript="  "), grpc.StatusCode.INVALID_ARGUMENT, "transcript is empty"),
    "not_audio": (dict(audio=b"not audio at all" * 100), grpc.StatusCode.INVALID_ARGUMENT, "not audio"),
    "empty": (dict(audio=b""), grpc.StatusCode.INVALID_ARGUMENT, "is empty"),
    "8khz": (dict(audio=recording(rate=8_000)), grpc.StatusCode.INVALID_ARGUMENT, "at least 16000 Hz"),
    "silence": (dict(audio=recording(level=0.0)), grpc.StatusCode.INVALID_ARGUMENT, "silent"),
    "short": (dict(audio=recording(seconds=0.5)), grpc.StatusCode.INVALID_ARGUMENT, "at least 1 s"),
    "long": (dict(audio=recording(seconds=31, rate=16_000)), grpc.StatusCode.INVALID_ARGUMENT, "longer than 30 s"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_registration_is_refused_with_the_reason_before_any_encoding(tmp_path, case):
    fields, code, words = BAD[case]

    async def scenario():
        async with gateway_with(tmp_path / "voices") as ((neutts,), stub, _, _):
            request = gateway_pb2.RegisterVoiceRequest(**{"name": "anna", "audio": recording(),
                                                           "transcript": TRANSCRIPT, **fields})
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.RegisterVoice(request, timeout=20)
            return err.value, neutts.encoded

    err, encoded = run(scenario())
    assert err.code() == code and words in err.details()
    assert encoded == [] and VoiceStore(tmp_path / "voices").names() == []


def test_a_name_registered_twice_keeps_the_first_voice(tmp_path):
    async def scenario():
        async with gateway_with(tmp_path / "voices") as (_, stub, _, _):
            await stub.RegisterVoice(gateway_pb2.RegisterVoiceRequest(
                name="anna", audio=recording(), transcript=TRANSCRIPT), timeout=20)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.RegisterVoice(gateway_pb2.RegisterVoiceRequest(
                    name="anna", audio=recording(level=0.5), transcript="Another text."), timeout=20)
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await stub.DeleteVoice(gateway_pb2.DeleteVoiceRequest(name="nobody"))
            with pytest.raises(grpc.aio.AioRpcError) as fixed:
                await stub.DeleteVoice(gateway_pb2.DeleteVoiceRequest(name="tara"))
            return err.value, missing.value, fixed.value

    err, missing, fixed = run(scenario())
    assert fixed.code() == grpc.StatusCode.FAILED_PRECONDITION and "fixed voice" in fixed.details()
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS and "delete it first" in err.details()
    assert missing.code() == grpc.StatusCode.NOT_FOUND
    assert VoiceStore(tmp_path / "voices").get("anna").transcript == TRANSCRIPT


def test_without_a_voice_store_registration_is_refused_and_says_how_to_enable_it(tmp_path):
    async def scenario():
        async with gateway_with(tmp_path / "voices", store=False) as (_, stub, _, http):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.RegisterVoice(gateway_pb2.RegisterVoiceRequest(
                    name="anna", audio=recording(), transcript=TRANSCRIPT), timeout=20)
            over_http = await http.post("/v1/audio/voices", json={
                "name": "anna", "transcript": TRANSCRIPT, "audio": base64.b64encode(recording()).decode()})
            return err.value, over_http

    err, over_http = run(scenario())
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "--voice-store" in err.details()
    assert over_http.status_code == 400 and "--voice-store" in over_http.json()["error"]["message"]


def test_the_encoders_refusal_is_passed_on_and_an_unreachable_server_gives_way_to_the_next(tmp_path):
    refusing = FakeTokenService(family="neutts-air",
                                encode_fails_with=(grpc.StatusCode.INVALID_ARGUMENT, "reference holds NaN"))
    busy = FakeTokenService(family="neutts-air", encode_fails_with=(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy"))
    working = FakeTokenService(family="neutts-air")

    async def scenario():
        async with gateway_with(tmp_path / "a", refusing) as (_, stub, _, _):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.RegisterVoice(gateway_pb2.RegisterVoiceRequest(
                    name="anna", audio=recording(), transcript=TRANSCRIPT), timeout=20)
        async with gateway_with(tmp_path / "b", busy, working) as (_, stub, _, _):
            await stub.RegisterVoice(gateway_pb2.RegisterVoiceRequest(
                name="anna", audio=recording(), transcript=TRANSCRIPT), timeout=20)
        return err.value

    err = run(scenario())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "reference holds NaN" in err.details()
    assert VoiceStore(tmp_path / "a").names() == [] and VoiceStore(tmp_path / "b").names() == ["anna"]
    assert len(working.encoded) == 1 and len(busy.encoded) <= 1


def test_http_registers_and_deletes_a_voice_with_openai_shaped_errors(tmp_path):
    async def scenario():
        async with gateway_with(tmp_path / "voices") as ((neutts,), _, _, http):
            audio = base64.b64encode(recording(fmt="FLAC")).decode()
            made = await http.post("/v1/audio/voices", json={"name": "anna", "transcript": TRANSCRIPT, "audio": audio})
            spoken = await http.post("/v1/audio/speech", json={"model": "neutts-air", "input": "Hi.", "voice": "anna",
                                                              "response_format": "pcm"})
            again = await http.post("/v1/audio/voices", json={"name": "anna", "transcript": TRANSCRIPT, "audio": audio})
            form = await http.post("/v1/audio/voices", data={"name": "bob", "transcript": TRANSCRIPT},
                                   files={"audio": ("ref.wav", recording())})
            bad64 = await http.post("/v1/audio/voices", json={"name": "bob", "transcript": TRANSCRIPT, "audio": "%%%"})
            no_audio = await http.post("/v1/audio/voices", json={"name": "bob", "transcript": TRANSCRIPT})
            deleted = await http.delete("/v1/audio/voices/anna")
            deleted_again = await http.delete("/v1/audio/voices/anna")
            fixed = await http.delete("/v1/audio/voices/tara")
            listed = (await http.get("/v1/audio/voices")).json()
            return made, spoken, again, form, bad64, no_audio, deleted, deleted_again, fixed, listed, neutts.encoded

    made, spoken, again, form, bad64, no_audio, deleted, deleted_again, fixed, listed, encoded = run(scenario())
    assert made.status_code == 201
    assert made.json() == {"id": "anna", "name": "anna", "description": "registered from reference audio (neutts-air)",
                           "reference_seconds": 2.0, "reference_frames": 100}
    assert spoken.status_code == 200 and len(encoded) == 1
    assert again.status_code == 409 and again.json()["error"]["code"] == "already_exists"
    assert form.status_code == 415  # a form is what any page can make a browser send
    assert bad64.status_code == 400 and "base64" in bad64.json()["error"]["message"]
    assert no_audio.status_code == 400 and "`audio` is required" in no_audio.json()["error"]["message"]
    assert deleted.status_code == 200 and deleted_again.status_code == 404
    assert fixed.status_code == 400 and "fixed voice" in fixed.json()["error"]["message"]
    assert "anna" not in {v["id"] for v in listed["voices"]}


def test_a_riva_zero_shot_prompt_is_cloned_once_and_spoken(tmp_path):
    wav = recording()
    pcm = soundfile.read(io.BytesIO(wav), dtype="int16")[0].tobytes()

    def request(prompt: bytes, rate: int = 0, transcript: str = TRANSCRIPT) -> riva_tts_pb2.SynthesizeSpeechRequest:
        return riva_tts_pb2.SynthesizeSpeechRequest(
            text="Cloned.", encoding=riva_audio_pb2.LINEAR_PCM, sample_rate_hz=24_000, voice_name="tara",
            zero_shot_data=riva_tts_pb2.ZeroShotData(audio_prompt=prompt, sample_rate_hz=rate, quality=20,
                                                     encoding=riva_audio_pb2.LINEAR_PCM, transcript=transcript))

    async def scenario():
        async with gateway_with(tmp_path / "voices") as ((neutts,), _, channel, _):
            riva = riva_tts_pb2_grpc.RivaSpeechSynthesisStub(channel)
            first = await riva.Synthesize(request(wav), timeout=20)
            await riva.Synthesize(request(wav), timeout=20)
            bare = await riva.Synthesize(request(pcm, rate=24_000), timeout=20)
            refusals = []
            for bad in (request(wav, transcript=""), request(pcm), request(b"")):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await riva.Synthesize(bad, timeout=20)
                refusals.append((err.value.code(), err.value.details()))
            return first, bare, [r.voice for r in neutts.requests], len(neutts.encoded), refusals

    first, bare, voices, encodes, refusals = run(scenario())
    assert first.audio and bare.audio
    # The repeated prompt was not encoded again; the same samples sent bare are wrapped
    # in the WAV a file holds, so they are the same recording and the same voice.
    assert len(voices) == 3 and voices[0].startswith("zero-shot-") and len(set(voices)) == 1
    assert encodes == 1
    assert [code for code, _ in refusals] == [grpc.StatusCode.INVALID_ARGUMENT] * 3
    assert "transcript is empty" in refusals[0][1] and "sample_rate_hz" in refusals[1][1]
    assert "audio_prompt is empty" in refusals[2][1]


def test_the_store_holds_at_most_max_voices_and_a_known_zero_shot_prompt_still_speaks_at_the_limit(tmp_path):
    """Every distinct zero-shot prompt registers a voice, so the store is bounded."""
    def zero_shot(level: float) -> riva_tts_pb2.SynthesizeSpeechRequest:
        return riva_tts_pb2.SynthesizeSpeechRequest(
            text="Cloned.", encoding=riva_audio_pb2.LINEAR_PCM, sample_rate_hz=24_000,
            zero_shot_data=riva_tts_pb2.ZeroShotData(audio_prompt=recording(level=level), transcript=TRANSCRIPT))

    async def scenario():
        async with gateway_with(tmp_path / "voices", max_voices=2) as ((neutts,), stub, channel, _):
            riva = riva_tts_pb2_grpc.RivaSpeechSynthesisStub(channel)
            await stub.RegisterVoice(gateway_pb2.RegisterVoiceRequest(
                name="anna", audio=recording(), transcript=TRANSCRIPT), timeout=20)
            await riva.Synthesize(zero_shot(0.4), timeout=20)
            with pytest.raises(grpc.aio.AioRpcError) as full:
                await riva.Synthesize(zero_shot(0.5), timeout=20)
            again = await riva.Synthesize(zero_shot(0.4), timeout=20)
            await stub.DeleteVoice(gateway_pb2.DeleteVoiceRequest(name="anna"))
            await riva.Synthesize(zero_shot(0.5), timeout=20)
            return full.value, again, len(neutts.encoded)

    full, again, encodes = run(scenario())
    assert full.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-voices" in full.details()
    assert again.audio and encodes == 3
    assert len(VoiceStore(tmp_path / "voices").names()) == 2


def test_a_reference_over_a_mebibyte_registers(tmp_path):
    """A gateway with a voice store reads messages up to the largest upload (10 s of
    48 kHz WAV is 0.9 MiB; 20 s is 1.8 MiB, over the 1 MiB every other call is held to)."""
    audio = recording(seconds=20, rate=48_000)
    assert len(audio) > 1024 * 1024

    async def scenario():
        async with gateway_with(tmp_path / "voices") as ((neutts,), stub, _, http):
            reply = await stub.RegisterVoice(gateway_pb2.RegisterVoiceRequest(
                name="long", audio=audio, transcript=TRANSCRIPT), timeout=30)
            over_http = await http.post("/v1/audio/voices", json={
                "name": "long-http", "transcript": TRANSCRIPT, "audio": base64.b64encode(audio).decode()})
            return reply, over_http, neutts.encoded

    reply, over_http, encoded = run(scenario())
    assert reply.reference_frames == 1000 and over_http.status_code == 201
    assert len(encoded[0].audio.samples) == 20 * 16_000


# --- every door gets every rule, and the worst a client can send ---------------------

AUDIO_RULES = {
    "not_audio": (b"not audio at all" * 100, "not audio"),
    "8khz": (recording(rate=8_000), "at least 16000 Hz"),
    "silence": (recording(level=0.0), "silent"),
    "short": (recording(seconds=0.5), "at least 1 s"),
    "long": (recording(seconds=31, rate=16_000), "longer than 30 s"),
}


async def _register(door: str, stub, channel, http, audio: bytes, name: str = "anna", transcript: str = TRANSCRIPT):
    """(refused, message) of one registration through `door`; Riva registers by zero-shot
    prompt. Riva reads bytes that are no container as bare PCM, so bytes that are not
    audio go to it claiming to be Ogg, as a client sending a broken file would."""
    if door == "tts.v1":
        try:
            await stub.RegisterVoice(gateway_pb2.RegisterVoiceRequest(name=name, audio=audio, transcript=transcript),
                                     timeout=30)
            return False, ""
        except grpc.aio.AioRpcError as err:
            return err.code(), err.details()
    if door == "http":
        reply = await http.post("/v1/audio/voices", json={"name": name, "transcript": transcript,
                                                          "audio": base64.b64encode(audio).decode()})
        return (False, "") if reply.status_code == 201 else (reply.status_code, reply.json()["error"]["message"])
    try:
        await riva_tts_pb2_grpc.RivaSpeechSynthesisStub(channel).Synthesize(riva_tts_pb2.SynthesizeSpeechRequest(
            text="Cloned.", encoding=riva_audio_pb2.LINEAR_PCM, sample_rate_hz=24_000,
            zero_shot_data=riva_tts_pb2.ZeroShotData(
                audio_prompt=audio, transcript=transcript,
                encoding=riva_audio_pb2.LINEAR_PCM if audio.startswith(b"RIFF") else riva_audio_pb2.OGGOPUS)),
            timeout=30)
        return False, ""
    except grpc.aio.AioRpcError as err:
        return err.code(), err.details()


REFUSED = {"tts.v1": grpc.StatusCode.INVALID_ARGUMENT, "riva": grpc.StatusCode.INVALID_ARGUMENT, "http": 400}


@pytest.mark.parametrize("case", sorted(AUDIO_RULES))
@pytest.mark.parametrize("door", ["tts.v1", "http", "riva"])
def test_every_door_refuses_unusable_audio_with_the_same_reason_before_any_encoding(tmp_path, door, case):
    audio, words = AUDIO_RULES[case]

    async def scenario():
        async with gateway_with(tmp_path / "voices") as ((neutts,), stub, channel, http):
            return await _register(door, stub, channel, http, audio), neutts.encoded, neutts.requests

    (refused, message), encoded, spoken = run(scenario())
    assert refused == REFUSED[door] and words in message
    assert encoded == [] and spoken == [] and VoiceStore(tmp_path / "voices").names() == []


@pytest.mark.parametrize("door", ["tts.v1", "http", "riva"])
def test_every_door_holds_the_store_to_max_voices(tmp_path, door):
    async def scenario():
        async with gateway_with(tmp_path / "voices", max_voices=1) as (_, stub, channel, http):
            first = await _register(door, stub, channel, http, recording(), name="first")
            second = await _register(door, stub, channel, http, recording(level=0.5), name="second")
            return first, second

    first, (refused, message) = run(scenario())
    assert first == (False, "")
    assert refused == {"tts.v1": grpc.StatusCode.RESOURCE_EXHAUSTED, "riva": grpc.StatusCode.RESOURCE_EXHAUSTED,
                       "http": 429}[door] and "--max-voices" in message
    assert len(VoiceStore(tmp_path / "voices").names()) == 1


def _bare_pcm_prompt(rate: int) -> riva_tts_pb2.SynthesizeSpeechRequest:
    pcm = (recording(rate=16_000)[44:])  # the samples behind a 44-byte WAV header
    return riva_tts_pb2.SynthesizeSpeechRequest(
        text="Cloned.", encoding=riva_audio_pb2.LINEAR_PCM, sample_rate_hz=24_000,
        zero_shot_data=riva_tts_pb2.ZeroShotData(audio_prompt=pcm, sample_rate_hz=rate, transcript=TRANSCRIPT))


def test_the_worst_a_client_sends_to_registration_fails_only_that_request(tmp_path):
    """Huge names and transcripts, NUL, an upload one byte past the limit, a body past
    the port's limit, bare PCM that claims 2^31-1 or 1 sample a second: each is refused
    with a short reason, nothing is encoded or stored, and the gateway then registers
    and speaks as before."""
    too_big = b"\0" * (16 * 1024 * 1024 + 1)

    async def scenario():
        async with gateway_with(tmp_path / "voices") as ((neutts,), stub, channel, http):
            answers = {
                "long name": await _register("tts.v1", stub, channel, http, recording(), name="a" * 100_000),
                "long name http": await _register("http", stub, channel, http, recording(), name="a" * 100_000),
                "long transcript": await _register("tts.v1", stub, channel, http, recording(),
                                                   transcript="word " * 20_000),
                "long transcript riva": await _register("riva", stub, channel, http, recording(),
                                                        transcript="word " * 20_000),
                "NUL": await _register("http", stub, channel, http, recording(), transcript="Hi\0there."),
                "16 MiB + 1": await _register("tts.v1", stub, channel, http, too_big),
                "16 MiB + 1 riva": await _register("riva", stub, channel, http, too_big),
            }
            past_port = await http.post("/v1/audio/voices", content=b"{" + b" " * (23 * 1024 * 1024) + b"}",
                                        headers={"Content-Type": "application/json"})
            riva = riva_tts_pb2_grpc.RivaSpeechSynthesisStub(channel)
            for rate in (2**31 - 1, 1):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await riva.Synthesize(_bare_pcm_prompt(rate), timeout=30)
                answers[f"bare PCM at {rate} Hz"] = (err.value.code(), err.value.details())
            encoded_before = len(neutts.encoded)
            after = await _register("http", stub, channel, http, recording())
            spoken = await speak(stub, "anna")
            return answers, past_port, encoded_before, after, spoken

    answers, past_port, encoded_before, after, spoken = run(scenario())
    for what, (refused, message) in answers.items():
        assert refused in (grpc.StatusCode.INVALID_ARGUMENT, 400), what
        assert 0 < len(message) < 400, what
    assert "at most 2000" in answers["long transcript"][1] and "control characters" in answers["NUL"][1]
    assert "16,777,217 bytes" in answers["16 MiB + 1"][1] and "16,777,217 bytes" in answers["16 MiB + 1 riva"][1]
    assert "at most 384000 Hz" in answers[f"bare PCM at {2**31 - 1} Hz"][1]
    assert "at least 16000 Hz" in answers["bare PCM at 1 Hz"][1]
    assert past_port.status_code == 413
    assert encoded_before == 0 and after == (False, "") and spoken
    assert VoiceStore(tmp_path / "voices").names() == ["anna"]
