"""The gRPC door of `chorus.security.access`: `CallGuard` describes each call to the server's
AccessPolicy before its handler runs, aborts it with the policy's status when it is
refused, and releases what it held when it ends.

Health checks and reflection queries (unary calls to the open services) hold nothing
and are answered even while draining, so they pass straight through. The caller's key
id and client become attributes of the call's server span (the instrumentation
interceptor opened it around this one).
"""

from __future__ import annotations

import contextlib
import inspect
import urllib.parse

import grpc
from opentelemetry import trace

from chorus.security.access import AccessPolicy, Knock, Refusal, presented_key
from chorus.security.tls import peer_identities

OPEN_SERVICES = frozenset({
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
})


def _address(peer: str) -> tuple[str, str] | None:
    """(host, port) of an "ipv4:" or "ipv6:" gRPC peer string, else None."""
    scheme, _, rest = peer.partition(":")
    if scheme not in ("ipv4", "ipv6"):
        return None
    host, _, port = urllib.parse.unquote(rest).rpartition(":")
    return host.strip("[]"), port


def peer_host(peer: str) -> str:
    """The address part of a gRPC peer string: "ipv4:10.0.0.7:41234" -> "10.0.0.7",
    "ipv6:%5B::1%5D:5000" -> "::1"; other transports are one client each."""
    address = _address(peer)
    return address[0] if address else peer


def peer_connection(peer: str) -> str:
    """The connection of a gRPC peer string: "ipv4:10.0.0.7:41234" -> "10.0.0.7:41234",
    "ipv6:%5B::1%5D:5000" -> "[::1]:5000"."""
    address = _address(peer)
    if address is None:
        return peer
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class CallGuard(grpc.aio.ServerInterceptor):
    """One per server (`chorus.rpc.serving.new_server`), around its AccessPolicy."""

    def __init__(self, policy: AccessPolicy) -> None:
        self.policy = policy

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        is_open = method.split("/")[1] in OPEN_SERVICES
        streaming = handler.response_streaming
        if is_open and not streaming:
            return handler  # a health check or a reflection query: nothing to check or count
        knock = (method, is_open, streaming)
        if handler.request_streaming and streaming:
            return handler._replace(stream_stream=self._guarded(handler.stream_stream, knock))
        if handler.request_streaming:
            return handler._replace(stream_unary=self._guarded(handler.stream_unary, knock))
        if streaming:
            return handler._replace(unary_stream=self._guarded(handler.unary_stream, knock))
        return handler._replace(unary_unary=self._guarded(handler.unary_unary, knock))

    def _guarded(self, behavior, knock: tuple[str, bool, bool]):
        if inspect.isasyncgenfunction(behavior):
            async def guarded_stream(request, context):
                release = await self._admit(context, *knock)
                try:
                    async with contextlib.aclosing(behavior(request, context)) as responses:
                        async for response in responses:
                            yield response
                finally:
                    release()

            return guarded_stream

        async def guarded(request, context):
            release = await self._admit(context, *knock)
            try:
                return await behavior(request, context)
            finally:
                release()

        return guarded

    async def _admit(self, context: grpc.aio.ServicerContext, method: str, is_open: bool, streaming: bool):
        """The policy's answer for this call (aborting it if refused); returns what releases it."""
        peer = context.peer()
        knock = Knock(
            host=peer_host(peer), connection=peer_connection(peer), identities=peer_identities(context),
            secret=presented_key(context.invocation_metadata()), open=is_open, holds_stream=streaming, method=method,
        )
        try:
            admission = self.policy.admit(knock)
        except Refusal as refusal:
            await context.abort(grpc.StatusCode[refusal.code.name], refusal.message)
        trace.get_current_span().set_attributes(admission.caller.attributes)
        return admission.release
