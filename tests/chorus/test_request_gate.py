"""The request gate (chorus/rpc/request_gate.py) on a real grpc.aio server: a request
that does not parse ends its call at once with INVALID_ARGUMENT, on every call shape,
instead of UNKNOWN with a Python exception name or a streamed call left hanging."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2

from chorus.rpc.request_gate import RequestGate

SERVICE = "test.Gate"
# A HealthCheckRequest whose string field (1: service) holds invalid UTF-8.
NOT_UTF8 = b"\x0a\x02\xff\xfe"
GOOD = health_pb2.HealthCheckRequest(service="fine").SerializeToString()


def _reply(request: health_pb2.HealthCheckRequest) -> health_pb2.HealthCheckResponse:
    assert isinstance(request, health_pb2.HealthCheckRequest)  # the handler sees parsed messages
    return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


async def unary_unary(request, context):
    return _reply(request)


async def unary_stream(request, context):
    yield _reply(request)
    yield _reply(request)


async def stream_unary(requests, context):
    count = 0
    async for request in requests:
        _reply(request)
        count += 1
    return health_pb2.HealthCheckResponse(status=count)


async def stream_stream(requests, context):
    async for request in requests:
        yield _reply(request)


def _handlers():
    des, ser = health_pb2.HealthCheckRequest.FromString, health_pb2.HealthCheckResponse.SerializeToString
    return grpc.method_handlers_generic_handler(SERVICE, {
        "UnaryUnary": grpc.unary_unary_rpc_method_handler(unary_unary, des, ser),
        "UnaryStream": grpc.unary_stream_rpc_method_handler(unary_stream, des, ser),
        "StreamUnary": grpc.stream_unary_rpc_method_handler(stream_unary, des, ser),
        "StreamStream": grpc.stream_stream_rpc_method_handler(stream_stream, des, ser),
    })


async def _with_server(body):
    server = grpc.aio.server(interceptors=[RequestGate()])
    server.add_generic_rpc_handlers((_handlers(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            return await asyncio.wait_for(body(channel), timeout=30)  # a hang fails, not blocks
    finally:
        await server.stop(0)


def _method(channel, kind: str, name: str):
    # Requests go out as bytes, so the test can send what no client library would.
    return getattr(channel, kind)(f"/{SERVICE}/{name}", request_serializer=None,
                                  response_deserializer=health_pb2.HealthCheckResponse.FromString)


async def _unary_unary(channel, raw):
    return [await _method(channel, "unary_unary", "UnaryUnary")(raw)]


async def _unary_stream(channel, raw):
    return [r async for r in _method(channel, "unary_stream", "UnaryStream")(raw)]


async def _stream_unary(channel, raw):
    return [await _method(channel, "stream_unary", "StreamUnary")(iter([GOOD, raw]))]


async def _stream_stream(channel, raw):
    return [r async for r in _method(channel, "stream_stream", "StreamStream")(iter([GOOD, raw, GOOD]))]


CALLS = [_unary_unary, _unary_stream, _stream_unary, _stream_stream]


@pytest.mark.parametrize("call", CALLS, ids=lambda c: c.__name__.strip("_"))
def test_a_request_that_does_not_parse_ends_the_call_with_invalid_argument(call):
    async def body(channel):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(channel, NOT_UTF8)
        return caught.value

    error = asyncio.run(_with_server(body))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "does not parse" in error.details() and "UTF-8" in error.details()


@pytest.mark.parametrize("call", CALLS, ids=lambda c: c.__name__.strip("_"))
def test_requests_that_parse_reach_the_handler_as_messages(call):
    responses = asyncio.run(_with_server(lambda channel: call(channel, GOOD)))
    assert responses and all(isinstance(r, health_pb2.HealthCheckResponse) for r in responses)
