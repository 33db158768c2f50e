"""What every call to a Chorus server passes through before its handler: the request
is parsed here, and the call is counted for the drain.

Parsing. grpc Python deserializes a request before the handler sees it. When that
fails (invalid UTF-8 in a string field, a corrupt wire format), a unary request is
answered UNKNOWN with a Python exception name, and a streamed one raises out of the
request iterator wherever the handler reads it: in a reader task the failure was
lost and the call hung until its deadline. The guard takes each request as bytes and
parses it itself; a message that does not parse ends the call at once with
INVALID_ARGUMENT, whatever task was reading (an abort sends the status from any task
and cancels the handler).

Draining. grpc's own `server.stop(grace)` closes the listening socket first, so
during a drain health checks got "connection refused" instead of NOT_SERVING. With
the guard counting the calls in flight, a draining server keeps its port open:
health and reflection answer as usual, new work is refused with UNAVAILABLE (a
gateway or token server then tries another peer), and the server stops once the
work in flight has finished (see RunningServer.stop).
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any, AsyncIterator, Callable

import grpc
from google.protobuf.message import DecodeError

# Calls that are not work: they never hold a drain open, and are answered while draining.
_ALWAYS_ANSWERED = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def _problem(err: DecodeError) -> str:
    return (
        f"the request message does not parse ({err}); send a serialized message of the method's request type, "
        "with every string field valid UTF-8"
    )


async def _parsed(parse: Callable[[bytes], Any], raw: bytes, context: grpc.aio.ServicerContext) -> Any:
    try:
        return parse(raw)
    except DecodeError as err:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _problem(err))


async def _parsed_stream(parse, raws: AsyncIterator[bytes], context) -> AsyncIterator[Any]:
    async for raw in raws:
        yield await _parsed(parse, raw, context)


async def _result(outcome):
    return await outcome if inspect.isawaitable(outcome) else outcome


async def _responses(outcome) -> AsyncIterator[Any]:
    if hasattr(outcome, "__aiter__"):
        async for response in outcome:
            yield response
    else:  # a handler that writes with context.write() and returns nothing
        await _result(outcome)


class RequestGate(grpc.aio.ServerInterceptor):
    """One per server (`chorus.serving.new_server`); see the module's docstring."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    def drain(self) -> None:
        """From now on, new work is refused."""
        self.draining = True

    async def wait_idle(self) -> None:
        """Returns once no work is in flight."""
        await self._idle.wait()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        counted = not handler_call_details.method.startswith(_ALWAYS_ANSWERED)
        return self._wrap(handler, counted)

    async def _enter(self, context, counted: bool) -> None:
        if not counted:
            return
        if self.draining:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, "this server is draining before it stops; send the call to another"
            )
        self.in_flight += 1
        self._idle.clear()

    def _leave(self, counted: bool) -> None:
        if counted:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    def _wrap(self, handler: grpc.RpcMethodHandler, counted: bool) -> grpc.RpcMethodHandler:
        parse = handler.request_deserializer or (lambda raw: raw)
        serialize = handler.response_serializer
        enter, leave = self._enter, self._leave
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary_unary(raw, context):
                await enter(context, counted)
                try:
                    return await _result(inner(await _parsed(parse, raw, context), context))
                finally:
                    leave(counted)

            return grpc.unary_unary_rpc_method_handler(unary_unary, None, serialize)
        if handler.unary_stream is not None:
            inner = handler.unary_stream

            async def unary_stream(raw, context):
                await enter(context, counted)
                try:
                    async for response in _responses(inner(await _parsed(parse, raw, context), context)):
                        yield response
                finally:
                    leave(counted)

            return grpc.unary_stream_rpc_method_handler(unary_stream, None, serialize)
        if handler.stream_unary is not None:
            inner = handler.stream_unary

            async def stream_unary(raws, context):
                await enter(context, counted)
                try:
                    return await _result(inner(_parsed_stream(parse, raws, context), context))
                finally:
                    leave(counted)

            return grpc.stream_unary_rpc_method_handler(stream_unary, None, serialize)
        inner = handler.stream_stream

        async def stream_stream(raws, context):
            await enter(context, counted)
            try:
                async for response in _responses(inner(_parsed_stream(parse, raws, context), context)):
                    yield response
            finally:
                leave(counted)

        return grpc.stream_stream_rpc_method_handler(stream_stream, None, serialize)
