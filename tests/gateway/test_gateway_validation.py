"""The gateway refuses what it cannot serve before anything is generated, with a status and
a reason a person can act on.
"""

from __future__ import annotations

import grpc
import pytest

from chorus.proto.tts.v1 import common_pb2, gateway_pb2
from gateway.config import GatewayConfig

from fake_token_server import FakeTokenService, OPUS_44100, collect, gateway, run, token_server

BAD_REQUESTS = [
    (dict(text=""), "text is empty"),
    (dict(text="   \n "), "text is empty"),
    (dict(text="... !!!"), "nothing to speak"),
    (dict(text="x" * 101), "at most 100"),
    (dict(text="Hi.", voice="nobody"), "unknown voice 'nobody'"),
    (dict(text="Hi.", audio=gateway_pb2.AudioConfig(encoding=42)), "unsupported audio encoding 42"),
    (dict(text="Hi.", audio=gateway_pb2.AudioConfig(sample_rate_hz=12345)), "sample_rate_hz 12345"),
    (
        dict(text="Hi.", audio=OPUS_44100),
        "AUDIO_ENCODING_OGG_OPUS does not support 44100 Hz",
    ),
    (dict(text="Hi.", sampling=common_pb2.SamplingParams(temperature=3.0)), "sampling.temperature is 3"),
    (dict(text="Hi.", sampling=common_pb2.SamplingParams(top_p=0.0)), "sampling.top_p is 0"),
    (dict(text="Hi.", sampling=common_pb2.SamplingParams(repetition_penalty=float("nan"))), "repetition_penalty"),
    (dict(text="Hi.", request_id="r" * 200), "request_id is 200 characters"),
    (dict(text="Hi.", request_id="a\r\nforged log line"), "request_id has control characters"),
    (dict(text="Hi.", sampling=common_pb2.SamplingParams(max_tokens=6)), "at least 7 (one frame of audio)"),
]

@pytest.mark.parametrize("fields,message", BAD_REQUESTS, ids=[m for _, m in BAD_REQUESTS])
def test_bad_requests_get_invalid_argument_before_any_generation(fields, message):
    async def scenario():
        fake = FakeTokenService()
        async with token_server(fake) as address, gateway([address], max_text_chars=100) as stub:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await collect(stub.Synthesize(gateway_pb2.SynthesizeRequest(**fields)))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert message in err.value.details()
            assert fake.requests == []

    run(scenario())


def test_token_server_statuses_reach_the_client_with_their_origin():
    async def scenario():
        fake = FakeTokenService(fail_with=grpc.StatusCode.INVALID_ARGUMENT)
        async with token_server(fake) as address, gateway([address]) as stub:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await collect(stub.Synthesize(gateway_pb2.SynthesizeRequest(text="Hello.")))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert address in err.value.details() and "refuses" in err.value.details()

    run(scenario())


@pytest.mark.parametrize("method, raw", [
    ("Synthesize", b"\x0a\x02\xff\xfe"),  # text: invalid UTF-8
    ("Synthesize", b"\xff\xff\xff"),  # not protobuf at all
    ("GetLimits", b"\x0a\x05ab"),  # a length running past the end
])
def test_undecodable_request_bytes_are_invalid_argument(method, raw):
    """Defect: grpc answered a request that does not parse with UNKNOWN and a Python exception name."""
    async def scenario():
        async with token_server(FakeTokenService()) as address, gateway([address]) as stub:
            channel = stub.channel
            if method == "Synthesize":
                call = channel.unary_stream(f"/tts.v1.SynthesisService/{method}",
                                            request_serializer=lambda b: b, response_deserializer=lambda b: b)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    async for _ in call(raw, timeout=30):
                        pass
            else:
                call = channel.unary_unary(f"/tts.v1.SynthesisService/{method}",
                                           request_serializer=lambda b: b, response_deserializer=lambda b: b)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call(raw, timeout=30)
            # The same gateway still answers a good request.
            limits = await stub.GetLimits(gateway_pb2.GetLimitsRequest(), timeout=30)
            return err.value, limits

    err, limits = run(scenario())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert "does not parse" in err.details()
    assert limits.max_text_chars > 0


def test_config_rejects_nonsense():
    with pytest.raises(ValueError, match="at least one token server"):
        GatewayConfig(token_servers=())
    with pytest.raises(ValueError, match="must be host:port"):
        GatewayConfig(token_servers=("localhost",))
    with pytest.raises(ValueError, match="default voice"):
        GatewayConfig(token_servers=("a:1",), voices=("leo",), default_voice="tara")
