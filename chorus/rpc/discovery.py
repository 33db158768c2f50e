"""Endpoints behind configured addresses, re-resolved while the service runs.

In Kubernetes a peer pool is one name (a headless Service) that resolves to every
pod. A single gRPC channel to that name sends all calls to one pod (pick_first), so
the least-loaded choice would see one peer, failover would have nowhere to go, and
pods added by the autoscaler would get no traffic. Instead each configured host:port
is resolved to all its addresses, one channel is kept per address, and the set is
refreshed every few seconds. IP literals and localhost are used as they are.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from typing import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chorus.rpc.addresses import dial_address
from chorus.rpc.serving import new_channel
from chorus.security.tls import ChannelSecurity

log = logging.getLogger(__name__)

REFRESH_INTERVAL_S = 10.0
# How long a call waits for a peer to come back when none could take it: a
# restarted peer is found within a reconnect backoff (a second), and a call with
# nowhere to go should fail in seconds, not at the end of a long deadline.
PEER_RETURN_WAIT_S = 5.0


def _split(target: str) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    return host.strip("[]"), int(port)


def _is_literal(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


class EndpointSet:
    """The current endpoints of a list of targets, each with its own channel."""

    def __init__(self, targets: Sequence[str], security: ChannelSecurity = ChannelSecurity()) -> None:
        self.targets = tuple(targets)
        self._security = security
        self._resolved: dict[str, tuple[str, ...]] = {
            t: (t,) for t in self.targets if _is_literal(_split(t)[0])
        }
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._task: asyncio.Task | None = None

    def endpoints(self) -> list[str]:
        """Every known endpoint, in target order, without duplicates."""
        seen: dict[str, None] = {}
        for target in self.targets:
            for endpoint in self._resolved.get(target, ()):
                seen[endpoint] = None
        return list(seen)

    def channel(self, endpoint: str) -> grpc.aio.Channel:
        channel = self._channels.get(endpoint)
        if channel is None:
            channel = self._channels[endpoint] = new_channel(endpoint, self._security)
        return channel

    async def wait_until_any_ready(self, timeout_s: float, endpoints: Sequence[str] | None = None) -> bool:
        """True as soon as the channel to one of `endpoints` (all by default) is READY,
        False after `timeout_s`: a call that every peer refused waits here for one to
        come back instead of failing while its channel is between reconnect attempts."""
        endpoints = self.endpoints() if endpoints is None else endpoints
        if timeout_s <= 0 or not endpoints:
            return False
        waits = [asyncio.ensure_future(self.channel(e).channel_ready()) for e in endpoints]
        try:
            done, _ = await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
            return any(not w.cancelled() and w.exception() is None for w in done)
        finally:
            for w in waits:
                w.cancel()

    async def serving(self, endpoint: str, service: str, timeout_s: float) -> bool:
        """Whether the peer answers its health check for `service` with SERVING. A peer
        without a health service is judged by reachability alone."""
        stub = health_pb2_grpc.HealthStub(self.channel(endpoint))
        try:
            response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.aio.AioRpcError as err:
            return err.code() == grpc.StatusCode.UNIMPLEMENTED
        return response.status == health_pb2.HealthCheckResponse.SERVING

    async def refresh(self) -> None:
        loop = asyncio.get_running_loop()
        for target in self.targets:
            host, port = _split(target)
            if _is_literal(host):
                continue
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as err:
                log.warning("could not resolve %s (%s); keeping %d known endpoints",
                            target, err, len(self._resolved.get(target, ())))
                continue
            found = tuple(sorted({dial_address(info[4][0], port) for info in infos}))
            if found != self._resolved.get(target):
                log.info("%s -> %s", target, ", ".join(found))
                self._resolved[target] = found

    async def start(self, interval_s: float = REFRESH_INTERVAL_S) -> None:
        """Resolves once now, then keeps refreshing in the background."""
        await self.refresh()
        if any(not _is_literal(_split(t)[0]) for t in self.targets):
            self._task = asyncio.create_task(self._refresh_forever(interval_s))

    async def _refresh_forever(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            await self.refresh()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
