"""Clients of the HTTP door outside OpenAI's happy path (issue 19 item 7), against the
real gateway app in this process and fake token servers behind it:

- `stream: false` gets the whole file with its real length in the header (WAV's RIFF
  and data sizes, FLAC's total samples), which `wave` and `soundfile` read as the
  samples synthesized; streamed WAV keeps its "length unknown" header;
- `GET /v1/models` in OpenAI's list shape, behind the API keys like the other routes;
- `voice` as OpenAI's object `{"id": name}`;
- fields other servers define (Kokoro's `lang_code`, vLLM-Omni's `language`) are
  ignored with one warning per request naming them;
- the `openai` package's own calls for all of the above;
- Riva 2.28's realtime WebSocket synthesis, not supported: NVIDIA's client is told
  so, with what to use instead.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import socket
import struct
import sys
import wave

import numpy as np
import openai
import pytest
import soundfile

from chorus.speech.audio_formats import FORMATS
from chorus.speech.orpheus import SAMPLES_PER_FRAME
from fake_token_server import FakeTokenService, wait_until
from gateway.encoding import whole_file
from test_gateway_http import (  # noqa: F401 (keys_file: a fixture)
    ALICE, _count, bearer, http_gateway, keys_file, speech,
)

TEXT = "Hello there, this is a whole file."


def native_samples(fake: FakeTokenService, text: str = TEXT) -> int:
    return fake.frames_for(text) * SAMPLES_PER_FRAME


@pytest.mark.parametrize("fmt", ["wav", "flac"])
@pytest.mark.parametrize("rate", [24000, 16000])
def test_a_whole_wav_or_flac_says_its_length(fmt, rate):
    """Python's `wave` read 2,147,483,647 frames of the streamed WAV and soundfile
    refused the streamed FLAC ("array is too big"); the whole file reads as exactly
    the samples synthesized, and they are the samples of the raw PCM."""

    async def scenario():
        fake = FakeTokenService()
        async with http_gateway(fake) as (client, _):
            whole = await client.post("/v1/audio/speech",
                                      json=speech(input=TEXT, response_format=fmt, sample_rate=rate, stream=False))
            raw = await client.post("/v1/audio/speech",
                                    json=speech(input=TEXT, response_format="pcm", sample_rate=rate))
            return fake, whole, raw

    fake, whole, raw = asyncio.run(scenario())
    assert whole.status_code == 200, whole.text
    assert whole.headers["content-type"] == f"audio/{fmt}"
    assert int(whole.headers["content-length"]) == len(whole.content)
    pcm = np.frombuffer(raw.content, dtype="<i2")
    assert len(pcm) == native_samples(fake) * rate // 24000
    if fmt == "wav":
        with wave.open(io.BytesIO(whole.content)) as w:
            assert (w.getnframes(), w.getframerate()) == (len(pcm), rate)
            assert np.array_equal(np.frombuffer(w.readframes(w.getnframes()), dtype="<i2"), pcm)
    data, read_rate = soundfile.read(io.BytesIO(whole.content), dtype="int16")
    assert (len(data), read_rate) == (len(pcm), rate)
    assert np.array_equal(data, pcm)


@pytest.mark.parametrize("fmt,data", [
    ("mp3", b"ID3\x04" + b"\xff" * 40),
    ("wav", b"RIFF\xff\xff\xff\xffWAVE" + b"LIST\xff\xff\xff\x7f"),  # a chunk running past the end: no data chunk
    ("wav", b"not a wav file at all"),
    ("flac", b"fLaC\x84" + b"\x00" * 40),  # the first block is not STREAMINFO
])
def test_whole_file_leaves_what_it_cannot_read_as_it_is(fmt, data):
    assert whole_file(FORMATS[fmt], data, 48000) == data


def test_streamed_wav_keeps_its_streaming_header():
    """A stream cannot know its length when it starts: the sizes say "unknown"
    (0xFFFFFFFF, read to the end) and there is no Content-Length."""

    async def scenario():
        async with http_gateway(FakeTokenService()) as (client, _):
            return await client.post("/v1/audio/speech", json=speech(input=TEXT, response_format="wav"))

    reply = asyncio.run(scenario())
    assert reply.status_code == 200 and "content-length" not in reply.headers
    assert struct.unpack_from("<I", reply.content, 4)[0] == 0xFFFFFFFF


def test_a_failure_before_the_whole_file_is_an_error_status_not_a_short_file():
    async def scenario():
        fake = FakeTokenService(fail_after_frames=2)
        async with http_gateway(fake) as (client, _):
            return await client.post("/v1/audio/speech",
                                     json=speech(input="Hello there. " * 20, response_format="wav", stream=False))

    reply = asyncio.run(scenario())
    assert reply.status_code == 503 and reply.headers["content-type"] == "application/json"
    assert reply.json()["error"]["code"] == "unavailable"


def test_a_client_that_leaves_before_its_whole_file_stops_the_synthesis():
    """Nothing is written before the end, so only the disconnect tells: the synthesis
    (an endless one here) stops instead of holding its stream until the deadline.
    The client resets the connection (as a killed client's kernel does, and as a
    closed TLS connection reads); a plain FIN reads as a half-close, which still gets
    its response (test_http_hostile.py), so that synthesis runs to its end."""

    async def scenario():
        fake = FakeTokenService(endless=True, frame_delay_s=0.05)
        async with http_gateway(fake) as (_, running):
            host, port = running.endpoints["http"].rsplit(":", 1)
            reader, writer = await asyncio.open_connection(host, int(port))
            body = json.dumps(speech(response_format="wav", stream=False)).encode()
            writer.write(b"POST /v1/audio/speech HTTP/1.1\r\nHost: chorus\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            await writer.drain()
            await wait_until(lambda: fake.active == 1, "the synthesis to start")
            before = _count("POST /v1/audio/speech", "CANCELLED")
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.close()  # linger 0: a reset, not a FIN
            await wait_until(lambda: fake.active == 0, "the synthesis to stop after the client left", limit_s=30)
            # Counted as a call its client cancelled, once the handler has returned.
            await wait_until(lambda: _count("POST /v1/audio/speech", "CANCELLED") == before + 1, "the count")
            return fake

    assert asyncio.run(scenario()).cancelled == 1


def test_models_lists_openai_shaped_names_that_speech_accepts(keys_file):  # noqa: F811 (the fixture)
    async def scenario():
        fake = FakeTokenService()
        async with http_gateway(fake, api_keys_file=keys_file) as (client, _):
            before = {code: _count("GET /v1/models", code) for code in ("OK", "UNAUTHENTICATED")}
            refused = await client.get("/v1/models")
            listed = await client.get("/v1/models", headers=bearer(ALICE))
            spoken = [await client.post("/v1/audio/speech", headers=bearer(ALICE),
                                        json=speech(model=model["id"], response_format="pcm"))
                      for model in listed.json()["data"]]
            assert {code: _count("GET /v1/models", code) - before[code] for code in before} == {
                "OK": 1, "UNAUTHENTICATED": 1}
            return refused, listed, spoken

    refused, listed, spoken = asyncio.run(scenario())
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthenticated"
    assert listed.status_code == 200
    models = listed.json()
    assert models["object"] == "list" and "tts-1" in [m["id"] for m in models["data"]]
    for model in models["data"]:
        assert set(model) == {"id", "object", "created", "owned_by"}
        assert (model["object"], model["owned_by"]) == ("model", "chorus") and isinstance(model["created"], int)
    assert [reply.status_code for reply in spoken] == [200] * len(models["data"])


def test_voice_as_an_object_resolves_like_its_name():
    async def scenario():
        fake = FakeTokenService()
        async with http_gateway(fake) as (client, _):
            by_alias = await client.post("/v1/audio/speech", json=speech(voice={"id": "onyx"}, response_format="pcm"))
            by_name = await client.post("/v1/audio/speech", json=speech(voice={"id": "mia"}, response_format="pcm"))
            return fake, by_alias, by_name

    fake, by_alias, by_name = asyncio.run(scenario())
    assert (by_alias.status_code, by_name.status_code) == (200, 200)
    assert [request.voice for request in fake.requests] == ["leo", "mia"]


def test_fields_of_other_servers_are_ignored_with_one_warning(caplog):
    """Kokoro's client sends `lang_code` (and `stream`, which this door honours),
    vLLM-Omni's `language`: the speech comes, and the log names what was ignored."""

    async def scenario():
        fake = FakeTokenService()
        async with http_gateway(fake) as (client, _):
            reply = await client.post("/v1/audio/speech", json=speech(
                response_format="pcm", language="English", lang_code="a", request_id="others-1"))
            return fake, reply

    with caplog.at_level(logging.WARNING, logger="gateway.frontends.openai_http.request"):
        fake, reply = asyncio.run(scenario())
    assert reply.status_code == 200 and len(reply.content) // 2 == native_samples(fake, "Hello there.")
    warnings = [r.getMessage() for r in caplog.records if "does not know" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "others-1" in warnings[0] and "'lang_code'" in warnings[0] and "'language'" in warnings[0]


@pytest.mark.parametrize("body,message", [
    (speech(voice=["alloy"]), "`voice` must be a voice name"),
    (speech(voice={"name": "alloy"}), "`voice` as an object must be {\"id\": \"<voice name>\"}, got {'name': str}"),
    (speech(voice={"id": 7}), "got {'id': int}"),
    (speech(voice={"id": "alloy", "speed": 2}), "`voice` as an object must be"),
    (speech(stream="no"), "stream must be true"),
    (speech(stream=False, stream_format="sse"), "stream is false but stream_format is sse"),
    (speech(language="en", speed="fast"), "speed is 'fast'"),
])
def test_known_fields_of_the_wrong_shape_are_still_refused(body, message):
    async def scenario():
        fake = FakeTokenService()
        async with http_gateway(fake) as (client, _):
            return fake, await client.post("/v1/audio/speech", json=body)

    fake, reply = asyncio.run(scenario())
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"
    assert not fake.requests


def test_the_openai_package_lists_models_and_reads_a_whole_wav():
    """What a program written for OpenAI does: list the models, ask with a voice object
    and Kokoro's `stream: false` through `extra_body`, read the file with `wave`."""

    async def scenario():
        fake = FakeTokenService()
        async with http_gateway(fake) as (_, running):
            client = openai.AsyncOpenAI(base_url=f"http://{running.endpoints['http']}/v1", api_key="unused")
            models = await client.models.list()
            audio = await client.audio.speech.create(
                model=models.data[0].id, voice={"id": "alloy"}, input=TEXT, response_format="wav",
                extra_body={"stream": False})
            await client.close()
            return fake, models, audio.content

    fake, models, content = asyncio.run(scenario())
    assert "tts-1" in [m.id for m in models.data]
    assert fake.requests[0].voice == "tara"
    with wave.open(io.BytesIO(content)) as w:
        assert w.getnframes() == native_samples(fake)


# NVIDIA's realtime client opening its session, in a process of its own: its generated
# protos and Chorus's cannot share one protobuf descriptor pool.
RIVA_REALTIME_SESSION = """
import argparse, asyncio, sys
from riva.client.realtime import RealtimeClientTTS
args = argparse.Namespace(server=sys.argv[1], use_ssl=False, mint_api_key=None, endpoint="/v1/realtime",
                          query_params="intent=synthesize")
try:
    asyncio.run(RealtimeClientTTS(args)._initialize_http_session())
except Exception as refused:
    print(refused)
"""


def test_riva_realtime_synthesis_is_refused_with_what_to_use_instead():
    """Riva 2.28's realtime client (WebSocket synthesis) is not supported: its session
    call gets 501 with a message naming the doors to use, which the client shows."""

    async def scenario():
        async with http_gateway(FakeTokenService()) as (client, running):
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-c", RIVA_REALTIME_SESSION, running.endpoints["http"],
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
            printed, _ = await process.communicate()
            reply = await client.post("/v1/realtime/synthesis_sessions", json={})
            return printed.decode(), reply

    message, reply = asyncio.run(scenario())
    assert "Status: 501" in message and "SynthesizeOnline" in message, message
    assert reply.status_code == 501 and reply.json()["error"]["code"] == "unimplemented"
    assert "not supported" in reply.json()["error"]["message"]
