"""Both model families behind one gateway: a fixed voice goes to Orpheus token servers,
a voice of the voice store to the token servers of the family it was registered for,
through every door (tts.v1, Riva, the OpenAI endpoint), and ListVoices and
`GET /v1/audio/voices` list both. The token servers are fakes that report a family."""

from __future__ import annotations

import contextlib

import grpc
import httpx2 as httpx
import numpy as np
import pytest

from chorus.proto.riva import riva_audio_pb2, riva_tts_pb2, riva_tts_pb2_grpc
from chorus.proto.tts.v1 import gateway_pb2, gateway_pb2_grpc
from chorus.speech.voice_store import VoiceStore
from gateway.config import GatewayConfig
from gateway.server import start_server
from support.fake_token_server import FakeTokenService, run, token_server


@pytest.fixture()
def store(tmp_path):
    voices = VoiceStore(tmp_path / "voices")
    reference = np.zeros(16_000, np.float32)
    voices.register("anna", "neutts-air", "Hello, this is my voice.", reference, 16_000, codes={"neucodec_24khz": [1]})
    voices.register("other-family", "kokoro", "Hi.", reference, 16_000)
    voices.register("tara", "neutts-air", "A registered voice under a fixed voice's name.", reference, 16_000)
    return voices


@contextlib.asynccontextmanager
async def two_families(store):
    orpheus, neutts = FakeTokenService(), FakeTokenService(family="neutts-air")
    async with token_server(orpheus) as a, token_server(neutts) as b:
        running = await start_server(GatewayConfig(token_servers=(a, b), http_port=0, voice_store=store.root), port=0)
        channel = grpc.aio.insecure_channel(running.address)
        try:
            async with httpx.AsyncClient(base_url=f"http://{running.endpoints['http']}", timeout=60) as http:
                yield orpheus, neutts, channel, http
        finally:
            await channel.close()
            await running.stop(0)


async def synthesize(channel, voice: str) -> bytes:
    audio = b""
    async for message in gateway_pb2_grpc.SynthesisServiceStub(channel).Synthesize(
            gateway_pb2.SynthesizeRequest(text="Hello there.", voice=voice), timeout=20):
        audio += message.audio.data
    return audio


def test_each_voice_goes_to_its_familys_token_servers_through_every_door(store):
    async def scenario():
        async with two_families(store) as (orpheus, neutts, channel, http):
            await synthesize(channel, "tara")
            await synthesize(channel, "anna")
            riva = riva_tts_pb2_grpc.RivaSpeechSynthesisStub(channel)
            await riva.Synthesize(riva_tts_pb2.SynthesizeSpeechRequest(
                text="Riva.", voice_name="anna", encoding=riva_audio_pb2.LINEAR_PCM, sample_rate_hz=24000), timeout=20)
            spoken = await http.post("/v1/audio/speech", json={"model": "tts-1", "input": "OpenAI.", "voice": "anna",
                                                              "response_format": "pcm"})
            return [r.voice for r in orpheus.requests], [r.voice for r in neutts.requests], spoken.status_code

    to_orpheus, to_neutts, status = run(scenario())
    # A fixed voice wins over a registered one of the same name: existing clients hear what they did.
    assert to_orpheus == ["tara"]
    assert to_neutts == ["anna", "anna", "anna"] and status == 200


def test_both_families_voices_are_listed_and_bad_ones_refused_with_the_reason(store):
    async def scenario():
        async with two_families(store) as (_, neutts, channel, http):
            listed = await gateway_pb2_grpc.SynthesisServiceStub(channel).ListVoices(gateway_pb2.ListVoicesRequest())
            over_http = (await http.get("/v1/audio/voices")).json()
            refusals = {}
            for voice in ("nobody", "Anna!", "other-family"):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await synthesize(channel, voice)
                refusals[voice] = (err.value.code(), err.value.details())
            return listed, over_http, refusals, neutts.requests

    listed, over_http, refusals, reached = run(scenario())
    names = {voice.name: voice.description for voice in listed.voices}
    assert names["anna"] == "registered from reference audio (neutts-air)"
    assert "leo" in names and list(names)[0] == "tara"  # the default first, as before
    assert {voice["id"] for voice in over_http["voices"]} == set(names)
    assert refusals["nobody"][0] == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown voice 'nobody'" in refusals["nobody"][1] and "registered from reference audio" in refusals["nobody"][1]
    assert refusals["Anna!"][0] == grpc.StatusCode.INVALID_ARGUMENT  # not a store name: never a path
    # A voice of a family no token server here serves: unavailable, and said so.
    assert refusals["other-family"] == (grpc.StatusCode.UNAVAILABLE,
                                        "no token server here serves kokoro voices: voice 'other-family' cannot be spoken")
    assert reached == []


def test_a_gateway_without_a_voice_store_speaks_the_fixed_voices_only(store):
    async def scenario():
        async with token_server(FakeTokenService()) as address:
            running = await start_server(GatewayConfig(token_servers=(address,)), port=0)
            try:
                async with grpc.aio.insecure_channel(running.address) as channel:
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await synthesize(channel, "anna")
                    return err.value
            finally:
                await running.stop(0)

    err = run(scenario())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "registered" not in err.details()


def test_the_openai_model_field_may_name_a_family_and_then_the_voice_must_be_of_it(store):
    async def scenario():
        async with two_families(store) as (orpheus, neutts, _, http):
            def speech(model, voice):
                return http.post("/v1/audio/speech", json={"model": model, "input": "Hi.", "voice": voice,
                                                          "response_format": "pcm"})
            answers = [await speech("neutts-air", "anna"), await speech("tts-1", "anna"),
                       await speech("neutts-air", "tara"), await speech("orpheus", "anna"),
                       await speech("neutts-air", "")]
            models = (await http.get("/v1/models")).json()
            return answers, models, len(orpheus.requests), len(neutts.requests)

    answers, models, to_orpheus, to_neutts = run(scenario())
    assert [a.status_code for a in answers] == [200, 200, 400, 400, 400]
    assert "model neutts-air asks for a voice of the neutts-air family; 'tara' is of the orpheus family" in \
        answers[2].json()["error"]["message"]
    assert (to_orpheus, to_neutts) == (0, 2)  # refused requests reached no token server
    assert {"orpheus", "neutts-air", "tts-1"} <= {m["id"] for m in models["data"]}
