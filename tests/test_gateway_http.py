"""The gateway's HTTP port (OpenAI's speech endpoint, voices, health, the page) in this
process against fake token servers: request checks and the status each gRPC code
becomes. The end-to-end suite drives it with the `openai` package on the real stack."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import httpx2 as httpx
import pytest

from chorus.orpheus import SAMPLES_PER_FRAME
from gateway.config import GatewayConfig
from gateway.server import start_server
from fake_token_server import FakeTokenService, token_server


@contextlib.asynccontextmanager
async def http_gateway(fake: FakeTokenService, **overrides):
    async with token_server(fake) as address:
        running = await start_server(GatewayConfig(token_servers=(address,), http_port=0, **overrides), port=0)
        try:
            async with httpx.AsyncClient(base_url=f"http://{running.endpoints['http']}", timeout=60) as client:
                yield client, running
        finally:
            await running.stop(0)


def speech(**fields):
    return {"model": "tts-1", "input": "Hello there.", **fields}


BAD_BODIES = [
    ({"input": "Hi."}, "`model` is required"),
    (speech(input=""), "text is empty"),
    (speech(voice="nobody"), "unknown voice 'nobody'"),
    (speech(response_format="m4a"), "response_format 'm4a'"),
    (speech(speed=10), "speed is 10"),
    (speech(speed="fast"), "speed is 'fast'"),
    (speech(stream_format="websocket"), "stream_format 'websocket'"),
    (speech(sampling={"temperature": "hot"}), "sampling.temperature is 'hot'"),
    (speech(sampling={"top_p": 0}), "sampling.top_p is 0"),
    (speech(voices="alloy"), "unknown field(s) voices"),
    (speech(response_format="opus", sample_rate=44100), "does not support 44100 Hz"),
]


@pytest.mark.parametrize("body,message", BAD_BODIES, ids=[m for _, m in BAD_BODIES])
def test_bad_bodies_get_400_in_openai_shape(body, message):
    async def scenario():
        fake = FakeTokenService()
        async with http_gateway(fake) as (client, _):
            reply = await client.post("/v1/audio/speech", json=body)
            assert reply.status_code == 400
            error = reply.json()["error"]
            assert message in error["message"] and error["type"] == "invalid_request_error"
            assert not fake.requests

    asyncio.run(scenario())


def test_not_json_and_oversized_bodies():
    async def scenario():
        async with http_gateway(FakeTokenService(), max_text_chars=100) as (client, _):
            reply = await client.post("/v1/audio/speech", content=b"{nope")
            assert reply.status_code == 400 and "not JSON" in reply.json()["error"]["message"]
            reply = await client.post("/v1/audio/speech", json=speech(input="x" * 200_000))
            assert reply.status_code == 413

    asyncio.run(scenario())


@pytest.mark.parametrize("code,status", [
    (grpc.StatusCode.RESOURCE_EXHAUSTED, 429), (grpc.StatusCode.UNAVAILABLE, 503),
    (grpc.StatusCode.DEADLINE_EXCEEDED, 504), (grpc.StatusCode.INVALID_ARGUMENT, 400),
])
def test_grpc_codes_become_http_statuses(code, status):
    async def scenario():
        async with http_gateway(FakeTokenService(fail_with=code)) as (client, _):
            reply = await client.post("/v1/audio/speech", json=speech())
            assert reply.status_code == status
            assert reply.json()["error"]["code"] == code.name.lower()

    asyncio.run(scenario())


def test_audio_streams_with_its_content_type_and_voice_aliases_resolve():
    async def scenario():
        fake = FakeTokenService()
        async with http_gateway(fake) as (client, _):
            reply = await client.post("/v1/audio/speech", json=speech(voice="onyx", response_format="pcm"))
            assert reply.status_code == 200 and reply.headers["content-type"] == "audio/pcm"
            assert fake.requests[0].voice == "leo"
            assert len(reply.content) // 2 == fake.frames_for(fake.requests[0].text) * SAMPLES_PER_FRAME
            assert reply.headers["x-request-id"]
            voices = (await client.get("/v1/audio/voices")).json()
            assert voices["voices"][0]["id"] == "tara" and voices["aliases"]["alloy"] == "tara"
            page = await client.get("/")
            assert page.status_code == 200 and "window.chorus" in page.text

    asyncio.run(scenario())


def test_health_follows_serving_and_draining_refuses_new_speech():
    async def scenario():
        async with http_gateway(FakeTokenService()) as (client, running):
            assert (await client.get("/health")).json() == {"status": "serving"}
            await running.set_serving(False)
            health = await client.get("/health")
            assert health.status_code == 503
            reply = await client.post("/v1/audio/speech", json=speech())
            assert reply.status_code == 503 and "shutting down" in reply.json()["error"]["message"]

    asyncio.run(scenario())


def test_drain_lets_an_open_stream_finish():
    async def scenario():
        fake = FakeTokenService(frame_delay_s=0.05)
        async with http_gateway(fake) as (client, running):
            async with client.stream("POST", "/v1/audio/speech", json=speech(response_format="pcm")) as reply:
                chunks = reply.aiter_bytes()
                first = await anext(chunks)
                stopping = asyncio.ensure_future(running.stop(30))
                rest = b"".join([chunk async for chunk in chunks])
            await stopping
            assert (len(first) + len(rest)) // 2 == fake.frames_for(fake.requests[0].text) * SAMPLES_PER_FRAME

    asyncio.run(scenario())
