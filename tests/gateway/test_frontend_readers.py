"""A streaming call's text is read in a task of its own (gateway.frontends.shell's
reader, which tts.v1 and Riva share); however that task ends, the synthesis hears of
it, so a call whose request stream breaks ends with a status instead of waiting for
text until its deadline.

Every wait is bounded by asyncio.wait_for, so a reader that leaves the synthesis
waiting fails the test rather than hanging it.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from chorus.proto.riva import riva_tts_pb2
from chorus.proto.tts.v1 import gateway_pb2
from gateway.config import GatewayConfig
from gateway.errors import GatewayError, invalid
from gateway.frontends import shell
from gateway.frontends.riva.servicer import RivaSynthesisServicer
from gateway.frontends.tts_v1 import SynthesisServicer
from gateway.pipeline import Pipeline

from fake_token_server import PCM

CONFIG = GatewayConfig(token_servers=("127.0.0.1:1",))
GUARD_S = 10.0  # far past anything these need: only a hang reaches it


class ClientLibraryBug(Exception):
    """What nothing in the gateway expects: a request stream broken below the door."""


async def messages_then(error: BaseException, *messages):
    for message in messages:
        yield message
    raise error


async def next_piece(feed) -> str | None:
    return await asyncio.wait_for(feed.next_piece(first=True, deadline=time.monotonic() + 600), GUARD_S)


async def accept(message) -> bool:
    return True


async def refuse(message) -> bool:
    raise invalid(f"no {message}, thanks")


# (the door's take, the status the synthesis then sees)
READER_FAILURES = [
    # The stream breaks after a message the door took: not the door's fault, the client's.
    (accept, grpc.StatusCode.CANCELLED, "reading the request stream failed: stream torn"),
    # The door refused a message: its refusal reaches the synthesis as it is.
    (refuse, grpc.StatusCode.INVALID_ARGUMENT, "no pickles, thanks"),
]


@pytest.mark.parametrize("take,code,message", READER_FAILURES, ids=["stream breaks", "door refuses"])
def test_reader_that_stops_fails_the_feed_with_the_reason(take, code, message):
    async def scenario():
        feed = shell.text_feed(CONFIG)
        await shell.read_texts(messages_then(ClientLibraryBug("stream torn"), "pickles"), feed, take)
        with pytest.raises(GatewayError) as err:
            await next_piece(feed)
        return err.value

    err = asyncio.run(scenario())
    assert err.code == code
    assert message in err.message


def test_reader_ends_the_feed_when_the_door_says_the_input_ended():
    async def scenario():
        feed = shell.text_feed(CONFIG)

        async def push_until_end(message) -> bool:
            if message == "end":
                return False
            await feed.push(message)
            return True

        # The stream itself would break after `end`: the reader must not read that far.
        await shell.read_texts(messages_then(ClientLibraryBug("read past the end"), "Hello there.", "end"), feed,
                               push_until_end)
        return await next_piece(feed), await next_piece(feed)

    assert asyncio.run(scenario()) == ("Hello there.", None)


class FakeContext:
    """What a servicer asks of a gRPC call here: no deadline, and an abort that records the status."""

    def __init__(self) -> None:
        self.status: tuple[grpc.StatusCode, str] | None = None

    def time_remaining(self) -> None:
        return None

    def set_trailing_metadata(self, metadata) -> None:
        pass

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.status = (code, details)
        raise grpc.aio.AbortError()


def riva_online(requests, context):
    # No router: the stream breaks before any text, so no piece is ever generated.
    return RivaSynthesisServicer(CONFIG, Pipeline(None)).SynthesizeOnline(requests, context)


def tts_v1_streaming(requests, context):
    return SynthesisServicer(CONFIG, Pipeline(None)).StreamingSynthesize(requests, context)


DOORS = [
    (riva_online, riva_tts_pb2.SynthesizeSpeechRequest(sample_rate_hz=24000)),
    (tts_v1_streaming, gateway_pb2.StreamingSynthesizeRequest(config=gateway_pb2.StreamingSynthesizeConfig(audio=PCM))),
]


@pytest.mark.parametrize("door,first", DOORS, ids=["riva SynthesizeOnline", "tts.v1 StreamingSynthesize"])
def test_streaming_call_whose_request_stream_breaks_ends_cancelled_instead_of_hanging(door, first):
    """Defect: Riva's reader lacked the catch-all, so an unexpected error reading its
    requests killed the reader and left the synthesis waiting for text until the deadline."""
    async def scenario():
        context = FakeContext()
        responses = door(messages_then(ClientLibraryBug("stream torn"), first), context)

        async def drain():
            async for _ in responses:
                pass

        with pytest.raises(grpc.aio.AbortError):
            await asyncio.wait_for(drain(), GUARD_S)
        return context.status

    code, details = asyncio.run(scenario())
    assert code == grpc.StatusCode.CANCELLED
    assert "reading the request stream failed: stream torn" in details
