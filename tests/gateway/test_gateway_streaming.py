"""StreamingSynthesize: text that arrives in messages is spoken as it comes, and mistakes
or silence end the call with a clear status.
"""

from __future__ import annotations

import grpc
import pytest

from chorus.proto.tts.v1 import gateway_pb2
from chorus.speech.orpheus import SAMPLES_PER_FRAME

from fake_token_server import FakeTokenService, PCM, collect, gateway, in_order, run, token_server


def streaming(*messages):
    config = gateway_pb2.StreamingSynthesizeRequest(
        config=gateway_pb2.StreamingSynthesizeConfig(audio=PCM, request_id="bidi")
    )
    return [config, *messages]


def text(piece: str):
    return gateway_pb2.StreamingSynthesizeRequest(text=piece)


FLUSH = gateway_pb2.StreamingSynthesizeRequest(flush=gateway_pb2.Flush())
END = gateway_pb2.StreamingSynthesizeRequest(end=gateway_pb2.EndOfInput())


def test_streaming_speaks_text_as_it_arrives():
    async def scenario():
        fake = FakeTokenService()
        async with token_server(fake) as address, gateway([address]) as stub:
            call = stub.StreamingSynthesize()
            for message in streaming(text("Hello wor"), text("ld. How are")):
                await call.write(message)
            # A complete sentence is spoken before any more text or the end arrives.
            first = await call.read()
            assert first.WhichOneof("payload") == "audio"
            assert [r.text for r in fake.requests] == ["Hello world."]
            for message in (text(" you"), FLUSH, text(" Bye now."), END):
                await call.write(message)
            audio, summary, _ = await collect(call)
        audio = first.audio.data + audio
        spoken = " ".join(r.text for r in in_order(fake))
        assert spoken == "Hello world. How are you Bye now."
        assert summary.request_id == "bidi"
        assert summary.frames == sum(fake.frames_for(r.text) for r in fake.requests)
        assert len(audio) == summary.frames * SAMPLES_PER_FRAME * 2

    run(scenario())


def test_streaming_half_close_ends_input():
    async def scenario():
        fake = FakeTokenService()
        async with token_server(fake) as address, gateway([address]) as stub:
            call = stub.StreamingSynthesize(iter(streaming(text("No end marker, just a half-close"))))
            audio, summary, _ = await collect(call)
        assert [r.text for r in fake.requests] == ["No end marker, just a half-close"]
        assert len(audio) == summary.frames * SAMPLES_PER_FRAME * 2 > 0

    run(scenario())


STREAMING_MISTAKES = [
    ([text("Hello.")], "must carry `config`"),
    (streaming(END), "without any text"),
    (streaming(text("Hi."), streaming()[0]), "only be sent once"),
    (streaming(gateway_pb2.StreamingSynthesizeRequest()), "empty StreamingSynthesize message"),
    (streaming(text("x" * 101)), "at most 100"),
    ([], "closed before its first message"),
]


@pytest.mark.parametrize("messages,message", STREAMING_MISTAKES, ids=[m for _, m in STREAMING_MISTAKES])
def test_streaming_mistakes_get_invalid_argument(messages, message):
    async def scenario():
        fake = FakeTokenService()
        async with token_server(fake) as address, gateway([address], max_text_chars=100) as stub:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await collect(stub.StreamingSynthesize(iter(messages)))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert message in err.value.details()

    run(scenario())


def test_streaming_text_sent_far_ahead_of_speech_is_refused():
    async def scenario():
        fake = FakeTokenService()
        async with token_server(fake) as address, gateway([address], max_text_chars=100) as stub:
            # No sentence end, so nothing can be spoken yet, and 120 characters wait.
            messages = streaming(text("word " * 12), text("word " * 12), END)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await collect(stub.StreamingSynthesize(iter(messages)))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "120 characters are waiting" in err.value.details()

    run(scenario())


def test_streaming_message_with_invalid_utf8_ends_the_call_at_once():
    """Defect: a third message carrying invalid UTF-8 left the call hanging until its deadline."""
    async def scenario():
        fake = FakeTokenService()
        async with token_server(fake) as address, gateway([address]) as stub:
            channel = stub.channel
            raw = channel.stream_stream(
                "/tts.v1.SynthesisService/StreamingSynthesize",
                request_serializer=lambda b: b, response_deserializer=gateway_pb2.StreamingSynthesizeResponse.FromString,
            )
            call = raw(timeout=60)
            await call.write(streaming()[0].SerializeToString())
            await call.write(text("Hello.").SerializeToString())
            await call.write(b"\x12\x02\xff\xfe")  # field 2 (text): two bytes that are not UTF-8
            with pytest.raises(grpc.aio.AioRpcError) as err:
                while await call.read() is not grpc.aio.EOF:
                    pass
            return err.value

    err = run(scenario())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert "UTF-8" in err.details()


@pytest.mark.parametrize("messages", [[], [text("Hello there.")]], ids=["config only", "text, then silence"])
def test_streaming_call_that_never_closes_ends_at_the_request_deadline(messages):
    """Defect: with --request-deadline 15 a StreamingSynthesize that never closed was still open at 45 s."""
    async def scenario():
        fake = FakeTokenService()
        async with token_server(fake) as address, gateway([address], request_deadline_s=1.0) as stub:
            # The gateway's deadline is the shorter one; the client's only bounds the test.
            call = stub.StreamingSynthesize(timeout=60)
            for message in streaming(*messages):
                await call.write(message)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                while await call.read() is not grpc.aio.EOF:
                    pass
            return err.value

    err = run(scenario())
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "waiting for more text" in err.details()
