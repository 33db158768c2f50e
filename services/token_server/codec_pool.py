"""The codec workers a token server may use, with the codec room their load leaves it.

Workers are the endpoints behind the configured addresses (a headless Service
resolves to every pod), polled for their load (GetLoad) by a `chorus.rpc.peer_pool`
pool. Together with the streams this server opened since, a worker's load gives the
codec streams admission may count on (`streams_limit`). Least in-flight streams wins
a new stream; a worker that just failed sits out a cooldown so that new streams avoid
it while Kubernetes replaces it. Only workers that list this server's codec in their
load (`chorus.speech.codecs`) count for room, and a worker that lists only others never
gets a stream: a pool may hold workers of other model families.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import grpc

from chorus.proto.tts.v1 import codec_pb2, codec_pb2_grpc
from chorus.rpc.discovery import PEER_RETURN_WAIT_S, EndpointSet
from chorus.rpc.peer_pool import Peer, PeerPool
from chorus.security.tls import ChannelSecurity
from chorus.speech import codecs, orpheus

FAILED_WORKER_COOLDOWN_S = 5.0
LOAD_POLL_INTERVAL_S = 0.5
# Admission waits this long for a codec worker to come back before it refuses a
# request as UNAVAILABLE (which sends it to another token server).
WORKER_RETURN_WAIT_S = 1.5
LOAD_POLL_TIMEOUT_S = 1.0
NO_WORKERS = "this token server has no codec workers (--codec-workers is empty or does not resolve)"


class NoCodecWorkerError(Exception):
    """No codec worker is configured or reachable."""


@dataclass
class WorkerLoad:
    """What a worker last said about itself, and this server's streams on it then."""

    max_streams: int = 0
    capacity_streams: int = 0
    open_streams: int = 0
    ours_when_polled: int = 0
    numeric_mode: str = ""  # "" until the worker said
    codecs: frozenset[str] = frozenset()  # what the worker decodes (codecs.declared)

    def decodes(self, codec: str) -> bool:
        return codec in self.codecs

    def room_for_us(self) -> int:
        """Streams this server may hold on the worker: its real-time capacity (never
        above its stream cap) minus what other token servers hold there."""
        cap = min(self.max_streams, self.capacity_streams or self.max_streams)
        others = max(0, self.open_streams - self.ours_when_polled)
        return max(0, cap - others)


class CodecPool:
    """The codec workers this token server may use, with their load.

    `on_availability` hears after each poll whether any worker answers (the token
    server's own health).
    """

    def __init__(
        self, addresses: Sequence[str], security: ChannelSecurity = ChannelSecurity(), codec: str = orpheus.CODEC
    ) -> None:
        self.codec = codec
        self._workers: PeerPool[WorkerLoad] = PeerPool(
            EndpointSet(addresses, security), self._load_of, self._pick_order,
            kind="codec worker", interval_s=LOAD_POLL_INTERVAL_S, on_polled=self._polled,
            has_room=lambda load: load.decodes(codec),
        )
        self.endpoints = self._workers.endpoints
        self._in_flight: collections.Counter[str] = collections.Counter()
        # Most streams held on each worker since its poll began: what the worker may have
        # counted as ours (see _load_of).
        self._in_flight_peak: collections.Counter[str] = collections.Counter()
        self._open_total = 0  # the sum of _in_flight, one int for the engine thread to read
        self._failed_at: dict[str, float] = {}
        self._limit = 0
        self.on_availability: Callable[[bool], Awaitable[None]] | None = None

    async def start(self) -> None:
        await self._workers.start()

    async def close(self) -> None:
        await self._workers.close()

    async def poll(self) -> None:
        await self._workers.poll()

    def streams_limit(self) -> int:
        """Codec streams this server may hold now (read from the engine thread)."""
        return self._limit

    def open_streams(self) -> int:
        """Codec streams this server holds open now, on every worker (read from the engine thread)."""
        return self._open_total

    def unavailable_reason(self) -> str | None:
        """Why no stream can be decoded now, or None when some worker answers."""
        workers = self.endpoints.endpoints()
        if not workers:
            return NO_WORKERS
        if not self._workers.available():
            return f"this token server reaches none of its codec workers ({', '.join(workers)}); try another"
        answering = [w for w in self._workers.peers() if w.reachable and w.load is not None]
        if answering and not any(w.load.decodes(self.codec) for w in answering):
            return (f"none of this token server's codec workers decodes {self.codec} (they decode "
                    f"{_codecs_listed(answering)}); try another")
        return None

    def available(self) -> bool:
        """A codec worker answered the last poll, or none is configured (a token server
        without codec workers serves codes only)."""
        return not self.endpoints.targets or self.unavailable_reason() is None

    async def wait_for_return(self, timeout_s: float) -> bool:
        """When no worker answered the last poll: whether one answers within a brief
        wait (a restarted worker is found at its channel's next reconnect, within a second)."""
        return await self._workers.wait_for_room(min(timeout_s, WORKER_RETURN_WAIT_S)) is not None

    async def wait_for_a_worker(self, timeout_s: float) -> bool:
        """Waits up to `timeout_s` for a worker's channel to be ready (one coming back)."""
        return await self.endpoints.wait_until_any_ready(min(timeout_s, PEER_RETURN_WAIT_S))

    def numeric_mode(self, address: str) -> str:
        """The numeric mode `address` last reported ("" when unknown)."""
        load = self._workers.peer(address).load
        return load.numeric_mode if load is not None else ""

    def pick(self, exclude: set[str] = frozenset(), numeric_mode: str = "") -> str:
        """The least-loaded worker, not in `exclude`; with `numeric_mode`, only workers
        that reported that mode (a stream resumes only where it decodes to the same bits)."""
        ranked = self._workers.ranked()
        if not ranked:
            raise NoCodecWorkerError(NO_WORKERS)
        left = [w for w in ranked if w.address not in exclude]
        # A worker not heard from yet may still be tried, as any unanswered worker is (it
        # refuses a stream of a codec it does not load, and the stream fails over).
        ours = [w for w in left if w.load is None or w.load.decodes(self.codec)]
        if left and not ours:
            raise NoCodecWorkerError(f"no other codec worker decodes {self.codec} (those left decode "
                                     f"{_codecs_listed(left)})")
        candidates = [w.address for w in ours]
        if numeric_mode:
            others = candidates
            candidates = [w for w in candidates if self.numeric_mode(w) == numeric_mode]
            if others and not candidates:
                raise NoCodecWorkerError(
                    f"no other codec worker decodes in numeric mode {numeric_mode} (those left report "
                    f"{', '.join(sorted({self.numeric_mode(w) or 'nothing yet' for w in others}))}); a stream "
                    "resumes only on a worker that gives its audio the same bits"
                )
        if not candidates:
            raise NoCodecWorkerError(f"every codec worker failed for this stream: {', '.join(sorted(exclude))}")
        return candidates[0]

    async def encode(self, request: codec_pb2.EncodeRequest, timeout_s: float | None) -> codec_pb2.EncodeResponse:
        """Encodes on the least-loaded worker of our codec, and on the next when one is
        unreachable or busy; a refusal of the recording itself is final (another
        worker would refuse it alike) and raised as the worker's AioRpcError."""
        tried: set[str] = set()
        while True:
            address = self.pick(exclude=tried)  # NoCodecWorkerError once every worker was tried
            tried.add(address)
            try:
                return await self._stub(address).Encode(request, timeout=timeout_s)
            except grpc.aio.AioRpcError as err:
                if err.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED):
                    raise
                if err.code() == grpc.StatusCode.UNAVAILABLE:
                    self.mark_failed(address)
                last_error = f"{address}: {err.code().name}: {err.details()}"
                if len(tried) >= len(self._workers.ranked()):
                    raise NoCodecWorkerError(f"no codec worker could encode the reference (last, {last_error})") \
                        from None

    def open(self, address: str) -> grpc.aio.StreamStreamCall:
        self._in_flight[address] += 1
        self._in_flight_peak[address] = max(self._in_flight_peak[address], self._in_flight[address])
        self._open_total += 1
        return self._stub(address).Decode()

    def release(self, address: str) -> None:
        self._in_flight[address] -= 1
        self._open_total -= 1

    def mark_failed(self, address: str) -> None:
        self._failed_at[address] = time.monotonic()

    def _pick_order(self, worker: Peer[WorkerLoad]) -> tuple[bool, bool, int]:
        """Workers out of their cooldown first, then those that answer, then the fewest
        of our streams (endpoint order among equals)."""
        cooling = time.monotonic() - self._failed_at.get(worker.address, -1e9) <= FAILED_WORKER_COOLDOWN_S
        return cooling, not worker.reachable, self._in_flight[worker.address]

    def _stub(self, address: str) -> codec_pb2_grpc.CodecServiceStub:
        return codec_pb2_grpc.CodecServiceStub(self.endpoints.channel(address))

    async def _load_of(self, address: str) -> WorkerLoad:
        # A stream we open while the poll is on its way, or close while the worker has
        # yet to see it go, is in the worker's count: counted as another server's, it
        # took our own seat until the next poll (a request waited 0.5 s with N* streams
        # held). So ours is the most we held during the poll.
        self._in_flight_peak[address] = self._in_flight[address]
        reply = await self._stub(address).GetLoad(codec_pb2.GetLoadRequest(), timeout=LOAD_POLL_TIMEOUT_S)
        return WorkerLoad(
            max_streams=reply.max_streams,
            capacity_streams=reply.capacity_streams,
            open_streams=reply.open_streams,
            ours_when_polled=max(self._in_flight_peak[address], self._in_flight[address]),
            numeric_mode=reply.numeric_mode,
            codecs=codecs.declared(reply.codecs),
        )

    async def _polled(self) -> None:
        self._limit = sum(w.load.room_for_us() for w in self._workers.peers()
                          if w.reachable and w.load.decodes(self.codec))
        if self.on_availability is not None:
            await self.on_availability(self.available())


def _codecs_listed(workers: list[Peer[WorkerLoad]]) -> str:
    """What the given workers (each heard from) decode, for a message."""
    return ", ".join(sorted(set().union(*(w.load.codecs for w in workers))))
