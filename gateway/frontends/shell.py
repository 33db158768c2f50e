"""What every door does alike around a synthesis, written once so the doors cannot drift.

A door's own work is its wire format: the messages it reads, the options it maps
them to, the responses it writes. Around that each needs the same steps: take a
streaming call's first message (a stream may close before it), feed the rest of
its text to the synthesis, tag the request for traces and logs, and end a failed
call with the status its GatewayError carries. gRPC's doors end the call with the
error's code; the HTTP door answers with the HTTP status that code maps to, and
counts the request in the request metrics under the gRPC code its HTTP status maps
back to, so one table serves both directions. (Counting a gRPC call is the
server's interceptor's, `chorus.rpc.serving`, the same for every gRPC door.)

The reader is the part that drifted: a streaming call's text arrives in a task of
its own, and when that task dies of anything but a GatewayError the synthesis must
still hear of it, or the call waits for text until its deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc

from chorus.proto.tts.v1 import common_pb2
from chorus.telemetry import tracing
from gateway import validation
from gateway.config import GatewayConfig
from gateway.encoding import Encoded
from gateway.errors import GatewayError, invalid
from gateway.feed import TextFeed
from gateway.pipeline import Pipeline
from gateway.request_types import SynthesisOptions
from gateway.segmenter import Segmenter
from gateway.synthesis import synthesize

log = logging.getLogger(__name__)

Message = TypeVar("Message")

# The HTTP status of each gRPC code a synthesis or the access policy gives (others: 500).
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 400,  # after INVALID_ARGUMENT: a 400 counts as that
}
# ... read backwards to count an HTTP answer under its gRPC code, with the statuses
# only the HTTP port itself gives (a route or method it lacks, a body too slow,
# too large or not JSON).
_CODE_OF_STATUS = {
    **{status: code for code, status in reversed(_HTTP_STATUS.items())},
    404: grpc.StatusCode.NOT_FOUND, 405: grpc.StatusCode.UNIMPLEMENTED, 408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED, 415: grpc.StatusCode.INVALID_ARGUMENT,
    501: grpc.StatusCode.UNIMPLEMENTED,
}


def http_status(code: grpc.StatusCode) -> int:
    """The HTTP status a failure with gRPC `code` answers with."""
    return _HTTP_STATUS.get(code, 500)


def code_of_http_status(status: int | None) -> grpc.StatusCode:
    """The gRPC code an HTTP answer with `status` counts under (None: no answer, the client left)."""
    if status is None:
        return grpc.StatusCode.CANCELLED
    if 200 <= status < 400:
        return grpc.StatusCode.OK
    return _CODE_OF_STATUS.get(status, grpc.StatusCode.INTERNAL if status >= 500 else grpc.StatusCode.UNKNOWN)


class GrpcDoor:
    """A gRPC door's servicer: the gateway's settings, and the pipeline its calls run on."""

    def __init__(self, config: GatewayConfig, pipeline: Pipeline) -> None:
        self._config = config
        self._pipeline = pipeline

    def _synthesis(
        self, feed: TextFeed, options: SynthesisOptions, arrived: float
    ) -> contextlib.aclosing[AsyncIterator[Encoded | common_pb2.SynthesisSummary]]:
        """The call's synthesis, closed (its generations cancelled) when the block ends."""
        return contextlib.aclosing(synthesize(self._pipeline, feed, options, arrived))


def text_feed(config: GatewayConfig) -> TextFeed:
    """An empty feed for text that arrives in messages."""
    return TextFeed(Segmenter(config.segment_target_chars))


async def whole_text_feed(text: str, config: GatewayConfig) -> TextFeed:
    """A feed holding one whole, ended text."""
    return await TextFeed.of_text(text, Segmenter(config.segment_target_chars))


async def first_message(messages: AsyncIterator[Message], settings: str) -> Message:
    """A streaming call's first message, which carries its `settings`."""
    first = await anext(messages, None)
    if first is None:
        raise invalid(f"the stream closed before its first message, which must carry {settings}")
    return first


@contextlib.asynccontextmanager
async def streamed_text(
    messages: AsyncIterable[Message],
    config: GatewayConfig,
    settings: str,
    options_of: Callable[[Message], SynthesisOptions | Awaitable[SynthesisOptions]],
    take: Callable[[Message, TextFeed], Awaitable[bool]],
    first_has_text: bool = False,
) -> AsyncIterator[tuple[Message, SynthesisOptions, TextFeed]]:
    """A streaming call's input, for as long as the block runs: its first message (the
    `settings`) mapped by `options_of`, and a feed that a reader task fills with the
    rest through the door's `take` (the first too when `first_has_text`). `options_of`
    may be a coroutine function (Riva's zero-shot prompt is encoded before synthesis)."""
    messages = aiter(messages)
    first = await first_message(messages, settings)
    options = options_of(first)
    if inspect.isawaitable(options):
        options = await options
    tag(options)
    feed = text_feed(config)
    texts = _starting_with(first, messages) if first_has_text else messages
    reader = asyncio.create_task(read_texts(texts, feed, lambda message: take(message, feed)))
    try:
        yield first, options, feed
    finally:
        reader.cancel()


async def _starting_with(first: Message, rest: AsyncIterator[Message]) -> AsyncIterator[Message]:
    yield first
    async for message in rest:
        yield message


async def push_text(feed: TextFeed, text: str, config: GatewayConfig, whole: bool = False) -> None:
    """One message's text into the feed, each message and the text waiting bounded alike.
    A `whole` text (a door whose messages are texts, not pieces of one) is spoken
    now: its last word ends with it, and it is not held back for a sentence end."""
    validation.check_text_piece(text, config)
    if whole:
        await feed.push(text + " ")
        await feed.flush()
    else:
        await feed.push(text)
    validation.check_backlog(feed.waiting_chars, config)


async def read_texts(
    messages: AsyncIterator[Message], feed: TextFeed, take: Callable[[Message], Awaitable[bool]]
) -> None:
    """Feeds a streaming call's `messages` to `feed` through the door's `take` (False:
    the input ended), until the messages end; the feed then ends, or fails with
    whatever stopped it, so the synthesis never waits on a reader that is gone."""
    try:
        async for message in messages:
            if not await take(message):
                break
        await feed.end()
    except GatewayError as err:
        feed.fail(err)
    except Exception as err:  # the call broke on the client's side: end it, never leave it waiting
        feed.fail(GatewayError(grpc.StatusCode.CANCELLED, f"reading the request stream failed: {err}"))


def tag(options: SynthesisOptions, **extra: object) -> None:
    """The request's id, voice and output on its server span and log lines."""
    tracing.tag_request(options.spec.request_id, **{
        "chorus.voice": options.spec.voice,
        "chorus.encoding": options.format.name,
        "chorus.sample_rate_hz": options.sample_rate,
        **{f"chorus.{key}": value for key, value in extra.items()},
    })


@contextlib.asynccontextmanager
async def gateway_status(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    """A gRPC call that a GatewayError raised in the block ends with its status (server faults are logged)."""
    try:
        yield
    except GatewayError as err:
        if err.code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.DATA_LOSS):
            log.error("request failed: %s", err)
        await context.abort(err.code, err.message)


def printable_ascii(text: str) -> bool:
    """Whether `text` may travel as a header or text metadata value (a caller's id may not)."""
    return text.isascii() and text.isprintable()
