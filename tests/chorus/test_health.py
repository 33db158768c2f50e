"""Health tells the truth: a service is SERVING only while it can serve, and a
service whose upstream comes back serves again at once.

The gateway and the token server run in-process against fake upstreams (real gRPC
servers on loopback) that the tests stop and restart on the same port.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chorus.proto.tts.v1 import codec_pb2_grpc, gateway_pb2, gateway_pb2_grpc, token_server_pb2_grpc
from chorus.rpc.serving import new_server, serve_with_health
from chorus.speech.orpheus import SAMPLES_PER_FRAME
from gateway.config import GatewayConfig
from gateway.server import start_server as start_gateway
from fake_token_server import FakeTokenService
from test_token_server import FakeCodec, read_all, request, token_server

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.asynccontextmanager
async def fake_token_server(port: int):
    """A fake token server with no health service, as the gateway tests use."""
    server = grpc.aio.server()
    token_server_pb2_grpc.add_TokenServiceServicer_to_server(FakeTokenService(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    try:
        yield
    finally:
        await server.stop(0)


@contextlib.asynccontextmanager
async def fake_codec_worker(port: int):
    server = new_server()
    codec_pb2_grpc.add_CodecServiceServicer_to_server(FakeCodec(), server)
    running = await serve_with_health(server, ["tts.v1.CodecService"], port)
    await running.set_serving(True)
    try:
        yield
    finally:
        await running.stop(0)


async def wait_for_health(address: str, service: str, wanted, limit_s: float = 60.0) -> None:
    """Watches `service` until it reports `wanted`; fails after `limit_s` (a bound, not a measurement)."""
    async with grpc.aio.insecure_channel(address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=service),
                                                          timeout=limit_s)
        seen = []
        try:
            async for response in watch:
                seen.append(response.status)
                if response.status == wanted:
                    return
        except grpc.aio.AioRpcError as err:
            raise AssertionError(f"{service} never became {wanted} (saw {seen}): {err.code().name}") from None


def test_gateway_health_follows_its_token_servers_and_a_returning_one_serves_at_once():
    async def scenario():
        port = free_port()
        async with fake_token_server(port):
            running = await start_gateway(GatewayConfig(token_servers=(f"127.0.0.1:{port}",)), port=0)
        try:
            # Every token server is gone.
            await wait_for_health(running.address, "", NOT_SERVING)
            await wait_for_health(running.address, "tts.v1.SynthesisService", NOT_SERVING)
            async with fake_token_server(port), grpc.aio.insecure_channel(running.address) as channel:
                # Back: the next request must find it, without waiting for the gateway to notice.
                stub = gateway_pb2_grpc.SynthesisServiceStub(channel)
                responses = [r async for r in stub.Synthesize(gateway_pb2.SynthesizeRequest(text="Back again."),
                                                              timeout=60)]
                await wait_for_health(running.address, "", SERVING)
                return responses
        finally:
            await running.stop(0)

    responses = asyncio.run(scenario())
    assert responses[-1].WhichOneof("payload") == "summary" and responses[-1].summary.frames > 0


def test_token_server_health_follows_its_codec_workers_and_a_returning_one_serves_at_once(gguf_path):
    async def scenario():
        port = free_port()
        codec = fake_codec_worker(port)
        await codec.__aenter__()
        async with token_server(gguf_path, [f"127.0.0.1:{port}"]) as (running, stub):
            await wait_for_health(running.address, "tts.v1.TokenService", SERVING)
            await codec.__aexit__(None, None, None)
            await wait_for_health(running.address, "tts.v1.TokenService", NOT_SERVING)
            await wait_for_health(running.address, "", NOT_SERVING)
            async with fake_codec_worker(port):
                audio, _, summary = await read_all(stub.Generate(request(frames=4), timeout=60))
                await wait_for_health(running.address, "tts.v1.TokenService", SERVING)
        return audio, summary

    audio, summary = asyncio.run(scenario())
    pcm = np.concatenate([np.frombuffer(a.pcm, "<i2") for a in audio])
    assert len(pcm) == 4 * SAMPLES_PER_FRAME and summary.frames == 4


def test_a_token_server_without_codec_workers_serves_codes(gguf_path):
    async def scenario():
        async with token_server(gguf_path) as (running, _):
            await wait_for_health(running.address, "tts.v1.TokenService", SERVING)

    asyncio.run(scenario())


@pytest.mark.parametrize("host, dialed", [
    ("127.0.0.1", "127.0.0.1"), ("0.0.0.0", "127.0.0.1"), ("localhost", "127.0.0.1"), ("::1", "[::1]"), ("::", "[::1]"),
])
def test_a_server_is_dialed_where_it_listens(host, dialed):
    async def scenario():
        server = grpc.aio.server()
        running = await serve_with_health(server, ["tts.v1.Probe"], port=0, host=host)
        try:
            await running.set_serving(True)
            await wait_for_health(running.address, "", SERVING)
            return running.address, running.port
        finally:
            await running.stop(0)

    address, port = asyncio.run(scenario())
    assert address == f"{dialed}:{port}"
