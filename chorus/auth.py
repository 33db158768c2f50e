"""Who may call a Chorus port, and how many streams each caller may hold at once.

One server interceptor, `CallGuard`, checks every call before its handler runs:

1. the client certificate's identity, where the port takes only certain tiers (mTLS
   between services: a token server takes only gateways, a codec worker only token
   servers) -> PERMISSION_DENIED;
2. the API key, where the port needs one (the gateway's client port) ->
   UNAUTHENTICATED;
3. the streams the caller already holds, per client and per API key ->
   RESOURCE_EXHAUSTED for that caller only.

Health and reflection need no key and no particular identity, so probes and grpcurl
work (on an mTLS port a probe still needs a certificate from the CA to connect); their
streams (health Watch) still count against the client's limit.

A client is its certificate identity at its address when it has a certificate
(every pod of a tier shares one certificate, so the identity alone would make a
whole tier one client), else its address. Only calls that stream responses count as
streams: they are what holds a slot, a codec stream or a connection's worth of work.

The key id and client of each admitted call become attributes of its server span
(set on the current span, which the instrumentation interceptor opened around this
one) and go into the log; the secret never does.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import logging
import urllib.parse
from dataclasses import dataclass
from typing import Callable

import grpc
from opentelemetry import trace

from chorus.api_keys import ApiKeys
from chorus.tls import peer_identities

log = logging.getLogger(__name__)

OPEN_SERVICES = frozenset({
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
})

# Reasons a call was refused, as the services' refused-call counters label them.
NOT_ALLOWED = "not_allowed"
NO_KEY = "no_api_key"
BAD_KEY = "bad_api_key"
CLIENT_LIMIT = "client_limit"
KEY_LIMIT = "key_limit"


def peer_host(peer: str) -> str:
    """The address part of a gRPC peer string: "ipv4:10.0.0.7:41234" -> "10.0.0.7",
    "ipv6:%5B::1%5D:5000" -> "::1"; other transports are one client each."""
    scheme, _, rest = peer.partition(":")
    if scheme in ("ipv4", "ipv6"):
        host, _, _port = urllib.parse.unquote(rest).rpartition(":")
        return host.strip("[]")
    return peer


def presented_key(metadata) -> str | None:
    """The API key in `authorization: Bearer <key>` or `x-api-key: <key>`, if any."""
    for key, value in metadata or ():
        if not isinstance(value, str):
            continue
        if key == "authorization":
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
        elif key == "x-api-key" and value.strip():
            return value.strip()
    return None


@dataclass(frozen=True)
class _Call:
    method: str  # "/package.Service/Method"
    streaming: bool  # it streams responses: it holds a stream for as long as it runs

    @property
    def open(self) -> bool:
        return self.method.split("/")[1] in OPEN_SERVICES


@dataclass(frozen=True)
class Caller:
    client: str
    key_id: str | None = None


class CallGuard(grpc.aio.ServerInterceptor):
    def __init__(
        self,
        *,
        allowed_clients: tuple[str, ...] = (),
        api_keys: ApiKeys | None = None,
        max_streams_per_client: int = 0,
        max_streams_per_key: int = 0,
        on_refused: Callable[[str], None] = lambda reason: None,
    ) -> None:
        """`allowed_clients`: certificate identities this port takes (empty: any
        caller the transport let in). Limits of 0 mean none. `on_refused(reason)`
        counts refusals for the service's metrics."""
        self.allowed_clients = tuple(allowed_clients)
        self.api_keys = api_keys
        self.max_streams_per_client = max_streams_per_client
        self.max_streams_per_key = max_streams_per_key
        self._on_refused = on_refused
        self._client_streams: collections.Counter[str] = collections.Counter()
        self._key_streams: collections.Counter[str] = collections.Counter()

    @property
    def active(self) -> bool:
        """Whether it checks anything at all (a server without checks needs no interceptor)."""
        return bool(self.allowed_clients or self.api_keys or self.max_streams_per_client or self.max_streams_per_key)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        call = _Call(handler_call_details.method, handler.response_streaming)
        if call.open and not call.streaming:
            return handler  # a health check or a reflection query: nothing to check or count
        if handler.request_streaming and call.streaming:
            return handler._replace(stream_stream=self._guarded(handler.stream_stream, call))
        if handler.request_streaming:
            return handler._replace(stream_unary=self._guarded(handler.stream_unary, call))
        if call.streaming:
            return handler._replace(unary_stream=self._guarded(handler.unary_stream, call))
        return handler._replace(unary_unary=self._guarded(handler.unary_unary, call))

    def _guarded(self, behavior, call: _Call):
        if inspect.isasyncgenfunction(behavior):
            async def guarded_stream(request, context):
                release = await self._admit(context, call)
                try:
                    async with contextlib.aclosing(behavior(request, context)) as responses:
                        async for response in responses:
                            yield response
                finally:
                    release()

            return guarded_stream

        async def guarded(request, context):
            release = await self._admit(context, call)
            try:
                return await behavior(request, context)
            finally:
                release()

        return guarded

    async def _admit(self, context: grpc.aio.ServicerContext, call: _Call) -> Callable[[], None]:
        """Checks the caller (aborting the call if refused); returns what releases its streams."""
        host = peer_host(context.peer())
        identities = peer_identities(context) if self.allowed_clients else ()
        identity = next((i for i in identities if i in self.allowed_clients), None)
        if self.allowed_clients and identity is None and not call.open:
            shown = ", ".join(identities) or "none (no client certificate)"
            await self._refuse(
                context, NOT_ALLOWED, grpc.StatusCode.PERMISSION_DENIED,
                f"this port takes calls only from {', '.join(self.allowed_clients)} (--allowed-clients); "
                f"the client certificate names {shown}",
                host,
            )
        caller = Caller(client=f"{identity}@{host}" if identity else host)
        if self.api_keys is not None and not call.open:
            secret = presented_key(context.invocation_metadata())
            if secret is None:
                await self._refuse(
                    context, NO_KEY, grpc.StatusCode.UNAUTHENTICATED,
                    "this server needs an API key: send the metadata `authorization: Bearer <key>` "
                    "(or `x-api-key: <key>`)",
                    caller.client,
                )
            key_id = self.api_keys.lookup(secret)
            if key_id is None:
                await self._refuse(
                    context, BAD_KEY, grpc.StatusCode.UNAUTHENTICATED,
                    "the API key is not valid (mistyped, revoked or rotated); ask for a current key",
                    caller.client,
                )
            caller = Caller(caller.client, key_id)
        trace.get_current_span().set_attributes(_attributes(caller))
        if not call.streaming:
            return _nothing
        return await self._hold_stream(context, caller, call.method)

    async def _hold_stream(self, context, caller: Caller, method: str) -> Callable[[], None]:
        client_limit, key_limit = self.max_streams_per_client, self.max_streams_per_key
        if client_limit and self._client_streams[caller.client] >= client_limit:
            await self._refuse(
                context, CLIENT_LIMIT, grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"client {caller.client} already holds {client_limit} streams, the most one client may hold "
                "at once; wait for one to finish",
                caller.client, caller.key_id,
            )
        if caller.key_id and key_limit and self._key_streams[caller.key_id] >= key_limit:
            await self._refuse(
                context, KEY_LIMIT, grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"API key {caller.key_id} already holds {key_limit} streams, the most one key may hold "
                "at once; wait for one to finish",
                caller.client, caller.key_id,
            )
        self._client_streams[caller.client] += 1
        if caller.key_id:
            self._key_streams[caller.key_id] += 1
        # The gateway's access log names the key; inside the cluster it would only repeat the tier.
        log.log(logging.INFO if caller.key_id else logging.DEBUG, "%s from %s%s", method, caller.client,
                f" with key {caller.key_id}" if caller.key_id else "")

        def release() -> None:
            _decrement(self._client_streams, caller.client)
            if caller.key_id:
                _decrement(self._key_streams, caller.key_id)

        return release

    async def _refuse(self, context, reason: str, code: grpc.StatusCode, message: str,
                      client: str, key_id: str | None = None) -> None:
        self._on_refused(reason)
        level = logging.WARNING if reason == NOT_ALLOWED else logging.INFO
        log.log(level, "refused a call from %s%s: %s", client, f" with key {key_id}" if key_id else "", message)
        await context.abort(code, message)


def _nothing() -> None:
    pass


def _decrement(counts: collections.Counter[str], name: str) -> None:
    counts[name] -= 1
    if counts[name] <= 0:
        del counts[name]


def _attributes(caller: Caller) -> dict[str, str]:
    attributes = {"chorus.client": caller.client}
    if caller.key_id:
        attributes["chorus.api_key_id"] = caller.key_id
    return attributes
