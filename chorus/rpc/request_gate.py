"""What every call to a Chorus server passes through last, before its handler: the
request is parsed here.

grpc Python deserializes a request before the handler sees it. When that fails
(invalid UTF-8 in a string field, a corrupt wire format), a unary request is
answered UNKNOWN with a Python exception name, and a streamed one raises out of the
request iterator wherever the handler reads it: in a reader task the failure was
lost and the call hung until its deadline. The gate takes each request as bytes and
parses it itself; a message that does not parse ends the call at once with
INVALID_ARGUMENT, whatever task was reading (an abort sends the status from any task
and cancels the handler).

Who may call, and the drain's count of calls in flight, are the AccessPolicy's
(`chorus.security.access`), asked by the CallGuard in front of this gate.
"""

from __future__ import annotations

import inspect
from typing import Any, AsyncIterator, Callable

import grpc
from google.protobuf.message import DecodeError


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
    """One per server (`chorus.rpc.serving.new_server`); see the module's docstring."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        return _parsing(handler)


def _parsing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """`handler` taking its requests as bytes, parsed by `_parsed`."""
    parse = handler.request_deserializer or (lambda raw: raw)
    serialize = handler.response_serializer
    if handler.unary_unary is not None:
        inner = handler.unary_unary

        async def unary_unary(raw, context):
            return await _result(inner(await _parsed(parse, raw, context), context))

        return grpc.unary_unary_rpc_method_handler(unary_unary, None, serialize)
    if handler.unary_stream is not None:
        inner = handler.unary_stream

        async def unary_stream(raw, context):
            async for response in _responses(inner(await _parsed(parse, raw, context), context)):
                yield response

        return grpc.unary_stream_rpc_method_handler(unary_stream, None, serialize)
    if handler.stream_unary is not None:
        inner = handler.stream_unary

        async def stream_unary(raws, context):
            return await _result(inner(_parsed_stream(parse, raws, context), context))

        return grpc.stream_unary_rpc_method_handler(stream_unary, None, serialize)
    inner = handler.stream_stream

    async def stream_stream(raws, context):
        async for response in _responses(inner(_parsed_stream(parse, raws, context), context)):
            yield response

    return grpc.stream_stream_rpc_method_handler(stream_stream, None, serialize)
