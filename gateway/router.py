"""Sends each generation to the least-loaded token server, and elsewhere if it fails
before it started.

Load comes from each server's GetStatus, polled in the background so that routing
adds nothing to a request's time to first audio: (busy slots + queued requests) per
slot, plus the calls this gateway sent there since the last poll, so a burst does
not pile onto the server that looked idle a moment ago.

A call that fails with UNAVAILABLE (server down, no codec worker) or
RESOURCE_EXHAUSTED (queue full) before any response came is retried on the next
server: nothing reached the client, so nothing is duplicated. After the first
response a failure is the client's to see. Each attempt carries the request's
remaining time as its gRPC deadline, so the token server stops (and frees the slot)
when the client's deadline passes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from chorus import telemetry

from chorus.proto.tts.v1 import token_server_pb2, token_server_pb2_grpc
from chorus.discovery import EndpointSet
from chorus.tls import ChannelSecurity
from gateway.errors import GatewayError

log = logging.getLogger(__name__)

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
STATUS_TIMEOUT_S = 1.0


@dataclass
class _Server:
    address: str
    channel: grpc.aio.Channel
    stub: token_server_pb2_grpc.TokenServiceStub
    slots_total: int = 0
    capacity_streams: int = 0
    slots_busy: int = 0
    queue_depth: int = 0
    reachable: bool = True  # optimistic until a poll or a call says otherwise
    sent_since_poll: int = 0

    def load(self) -> float:
        """Work per stream it can hold at real time (its capacity, or its slots before it
        reports one); unreachable servers sort last but stay candidates (they may be back)."""
        work = self.slots_busy + self.queue_depth + self.sent_since_poll
        room = self.capacity_streams or self.slots_total
        per_stream = work / room if room else float(work)
        return per_stream + (1e9 if not self.reachable else 0.0)


class Router:
    def __init__(
        self, addresses: tuple[str, ...], status_interval_s: float = 0.25, security: ChannelSecurity = ChannelSecurity()
    ) -> None:
        # A name may stand for many token servers (a headless Service): route over
        # every address it resolves to, as they come and go.
        self._endpoints = EndpointSet(addresses, security)
        self._servers: list[_Server] = []
        self._interval = status_interval_s
        self._poller: asyncio.Task | None = None
        self._turn = 0  # round-robin among equally loaded servers

    async def start(self) -> None:
        """Resolves and polls once (so the first requests are routed on facts), then keeps polling."""
        await self._endpoints.start()
        await self.poll()
        self._poller = asyncio.create_task(self._poll_forever(), name="token-server-status")

    async def close(self) -> None:
        if self._poller:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        await self._endpoints.close()

    async def poll(self) -> None:
        known = {s.address: s for s in self._servers}
        self._servers = [known.get(a) or self._new_server(a) for a in self._endpoints.endpoints()]
        await asyncio.gather(*(self._poll_one(s) for s in self._servers))

    def _new_server(self, address: str) -> _Server:
        channel = self._endpoints.channel(address)
        return _Server(address, channel, token_server_pb2_grpc.TokenServiceStub(channel))

    def ranked(self) -> list[_Server]:
        """Servers, least loaded first; ties taken in turn."""
        self._turn += 1
        n = len(self._servers)
        if n == 0:
            return []  # nothing resolved yet: generate() reports UNAVAILABLE
        rotated = [self._servers[(self._turn + i) % n] for i in range(n)]
        return sorted(rotated, key=_Server.load)  # stable: equals keep the rotation

    async def generate(
        self, request: token_server_pb2.GenerateRequest, deadline: float
    ) -> AsyncIterator[token_server_pb2.GenerateResponse]:
        """Generate on the best server that takes it; `deadline` is time.monotonic() based."""
        failures: list[tuple[str, grpc.aio.AioRpcError]] = []
        for attempt, server in enumerate(self.ranked()):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise GatewayError(
                    grpc.StatusCode.DEADLINE_EXCEEDED, "the request's deadline passed before generation started"
                )
            server.sent_since_poll += 1
            # A retry's CLIENT span says so, and which servers refused before it.
            with telemetry.call_attributes(**_retry_attributes(attempt, failures)):
                call = server.stub.Generate(request, timeout=remaining)
            responded = False
            try:
                async for response in call:
                    responded = True
                    yield response
                return
            except grpc.aio.AioRpcError as err:
                if responded or err.code() not in RETRYABLE:
                    raise _relayed(server.address, err) from None
                if err.code() == grpc.StatusCode.UNAVAILABLE:
                    server.reachable = False
                log.warning("token server %s refused %s (%s: %s); trying another",
                            server.address, request.request_id, err.code().name, err.details())
                failures.append((server.address, err))
            finally:
                call.cancel()  # no-op once finished; frees the slot if our consumer went away
        raise _exhausted(failures)

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.poll()

    async def _poll_one(self, server: _Server) -> None:
        try:
            status = await server.stub.GetStatus(token_server_pb2.GetStatusRequest(), timeout=STATUS_TIMEOUT_S)
        except grpc.aio.AioRpcError as err:
            if server.reachable:
                log.warning("token server %s is unreachable: %s", server.address, err.code().name)
            server.reachable = False
            return
        if not server.reachable:
            log.info("token server %s is reachable again", server.address)
        server.reachable = True
        server.slots_total = status.slots_total
        server.capacity_streams = status.capacity_streams
        server.slots_busy = status.slots_busy
        server.queue_depth = status.queue_depth
        server.sent_since_poll = 0


def _retry_attributes(attempt: int, failures: list[tuple[str, grpc.aio.AioRpcError]]) -> dict[str, object]:
    if not attempt:
        return {}
    return {
        "chorus.retry": True,
        "chorus.attempt": attempt + 1,
        "chorus.refused_by": [f"{address}: {err.code().name}" for address, err in failures],
    }


def _relayed(address: str, err: grpc.aio.AioRpcError) -> GatewayError:
    """A token server's status, passed on with where it came from."""
    if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        return GatewayError(
            err.code(), "the request's deadline passed during generation; set a longer deadline for long texts"
        )
    return GatewayError(err.code(), f"token server {address}: {err.details()}")


def _exhausted(failures: list[tuple[str, grpc.aio.AioRpcError]]) -> GatewayError:
    seen = "; ".join(f"{address}: {err.code().name} ({err.details()})" for address, err in failures)
    if all(err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for _, err in failures):
        return GatewayError(
            grpc.StatusCode.RESOURCE_EXHAUSTED, f"every token server is at capacity, retry with backoff: {seen}"
        )
    return GatewayError(grpc.StatusCode.UNAVAILABLE, f"no token server could take the request: {seen}")
