"""Peers whose load is polled in the background, ranked, and waited for.

The gateway chooses among token servers and a token server among codec workers the
same way: each peer's load is polled off the request path (so choosing adds nothing
to a request's time to first audio), peers are ranked on it, and a request that found
no peer able to take it waits briefly for one to come back. The two once did this
apart and drifted: the gateway's poll loop ended on the first unexpected error, and a
gateway whose loop had died never saw a restarted token server again. So the
mechanism is here once, generic over what a peer reports: the user polls one peer
(`poll(address) -> load`), says how to rank and what load has room, and keeps its
own bookkeeping (calls sent since the poll, streams held) beside the pool.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import grpc

from chorus.rpc.discovery import EndpointSet

log = logging.getLogger(__name__)

Load = TypeVar("Load")


class NotServing(Exception):
    """A poll's answer for a peer that is up but says it takes no work (its health)."""


@dataclass
class Peer(Generic[Load]):
    """One peer and what its last answered poll said."""

    address: str
    load: Load | None = None  # kept while it does not answer: ranking may still read it
    reachable: bool = False  # answered its last poll and takes work


class PeerPool(Generic[Load]):
    """The peers behind an `EndpointSet`, polled every `interval_s` by `poll`.

    A poll that raises `grpc.aio.AioRpcError` or `NotServing` makes its peer
    unreachable until it answers again; any other exception is logged and polling
    goes on. `rank_key(peer)` orders peers (smallest tuple first; ties keep the rotation
    `ranked` was given), `has_room(load)` says whether an answering peer can take
    work now. `on_polled` runs after every poll of the whole set.
    """

    def __init__(
        self,
        endpoints: EndpointSet,
        poll: Callable[[str], Awaitable[Load]],
        rank_key: Callable[[Peer[Load]], tuple],
        *,
        kind: str,
        interval_s: float,
        has_room: Callable[[Load], bool] = lambda load: True,
        on_polled: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.endpoints = endpoints
        self._poll = poll
        self._rank_key = rank_key
        self._has_room = has_room
        self._on_polled = on_polled
        self._kind = kind  # "token server": for the log
        self._interval = interval_s
        self._peers: dict[str, Peer[Load]] = {}
        self._polled = asyncio.Event()  # set (and replaced) after each poll of the set
        self._poller: asyncio.Task | None = None

    async def start(self) -> None:
        """Resolves and polls once (so the first requests go by facts), then keeps polling."""
        await self.endpoints.start()
        await self.poll()
        self._poller = asyncio.create_task(self._poll_forever(), name=f"{self._kind} load")

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        await self.endpoints.close()

    def peers(self) -> list[Peer[Load]]:
        """Every resolved peer, in endpoint order (one resolved since the last poll: unreachable)."""
        return [self._peers.get(a) or Peer(a) for a in self.endpoints.endpoints()]

    def peer(self, address: str) -> Peer[Load]:
        return self._peers.get(address) or Peer(address)

    def available(self) -> bool:
        """Whether a peer answered the last poll and takes work."""
        return any(p.reachable for p in self._peers.values())

    def mark_unreachable(self, address: str) -> None:
        """A call found the peer gone: rank it last until a poll finds it again."""
        if address in self._peers:
            self._peers[address].reachable = False

    def ranked(self, turn: int = 0) -> list[Peer[Load]]:
        """Peers by `rank_key`, equals rotated by `turn` (round-robin among ties). Reads only."""
        peers = self.peers()
        rotated = [peers[(turn + i) % len(peers)] for i in range(len(peers))]
        return sorted(rotated, key=self._rank_key)  # stable: equals keep the rotation

    def roomiest(self) -> Peer[Load] | None:
        """The best-ranked peer that answers and has room, or None."""
        return next((p for p in self.ranked() if p.reachable and self._has_room(p.load)), None)

    async def poll(self) -> None:
        self._peers = {p.address: p for p in self.peers()}  # peers no longer resolved are forgotten
        await asyncio.gather(*(self._poll_one(p) for p in self._peers.values()))
        polled, self._polled = self._polled, asyncio.Event()
        polled.set()
        if self._on_polled is not None:
            await self._on_polled()

    async def wait_for_room(self, timeout_s: float) -> Peer[Load] | None:
        """The best peer with room, after waiting up to `timeout_s` for one; None when
        none had room by then. A peer coming back is polled as soon as its channel is
        ready (a restarted peer is found at its channel's next reconnect, within a
        second), not at the next interval; others are seen as the background polls them.
        With no peer resolved there is nothing to wait for (names re-resolve far less often)."""
        if not self.endpoints.endpoints():
            return None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        returning = [p.address for p in self._peers.values() if not p.reachable]
        returned = asyncio.ensure_future(self.endpoints.wait_until_any_ready(timeout_s, returning))
        try:
            while (best := self.roomiest()) is None:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return None
                polled = asyncio.ensure_future(self._polled.wait())
                waits = {polled} if returned.done() else {polled, returned}
                done, _ = await asyncio.wait(waits, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
                polled.cancel()
                if returned in done and returned.result():
                    await self.poll()
            return best
        finally:
            returned.cancel()

    async def _poll_forever(self) -> None:
        # Nothing a poll raises may end polling: a pool that stops polling never sees a
        # restarted peer again.
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.poll()
            except Exception:
                log.exception("polling %ss failed; polling goes on", self._kind)

    async def _poll_one(self, peer: Peer[Load]) -> None:
        try:
            load = await self._poll(peer.address)
        except (grpc.aio.AioRpcError, NotServing) as err:
            if peer.reachable:
                reason = err.code().name if isinstance(err, grpc.aio.AioRpcError) else str(err)
                log.warning("%s %s is unreachable: %s", self._kind, peer.address, reason)
            peer.reachable = False
            return
        if not peer.reachable and peer.load is not None:
            log.info("%s %s answers again", self._kind, peer.address)
        peer.load, peer.reachable = load, True
