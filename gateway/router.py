"""Sends each generation to the least-loaded token server, and elsewhere if it fails
before it started.

Load comes from each server's GetStatus, polled in the background so that routing
adds nothing to a request's time to first audio: (busy slots + queued requests) per
slot, plus the calls this gateway sent there since the last poll, so a burst does
not pile onto the server that looked idle a moment ago.

A call that fails with UNAVAILABLE (server down, no codec worker) or
RESOURCE_EXHAUSTED (queue full) before any response came is retried on the next
server: nothing reached the client, so nothing is duplicated. A seeded call that
fails after some of its audio was relayed is replayed on the next server with the
same seed: that server regenerates the codes (checked against the digest of those
already relayed before any of its audio is taken) and sends audio from the first
sample not yet relayed, so the listener hears at most a pause, never a cut or a
repeat. A replay whose codes differ ends the call UNAVAILABLE. When every server
refused a call as unreachable, it waits (briefly, within its deadline) for one to
come back and tries again, so that a restarted server takes the next request. Each attempt carries the request's
remaining time as its gRPC deadline, so the token server stops (and frees the slot)
when the client's deadline passes.

A server that hangs mid-stream (stopped, wedged) ends no call, so each call is
watched (chorus.rpc.stall): once it has sent audio, a server that sends none until the
listener's lead is down to the stall margin, and for at least the stall floor, is
taken for dead; its call is cancelled and fails over like UNAVAILABLE. Before an
attempt's first audio nothing is watched: a queue within capacity, or a replay
regenerating the codes already relayed, may legitimately take long.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from chorus.realtime.playback import DEFAULT_START_BUFFER_S
from chorus.rpc.stall import GATEWAY_STALL, StallPolicy, watched
from chorus.speech import orpheus
from chorus.speech.family import ORPHEUS, reported_family
from chorus.telemetry import tracing

from chorus.proto.tts.v1 import common_pb2, token_server_pb2, token_server_pb2_grpc
from chorus.rpc.discovery import PEER_RETURN_WAIT_S, EndpointSet
from chorus.rpc.peer_pool import NotServing, Peer, PeerPool
from chorus.security.tls import ChannelSecurity
from gateway.errors import GatewayError

log = logging.getLogger(__name__)

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
# Mid-stream failures that a replay elsewhere may cure: the server died or lost its
# codec workers. Anything else is the request's own.
FAILOVER = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})
STATUS_TIMEOUT_S = 1.0
MAX_DUE_IN_S = 3600.0  # the most a token server accepts in playback.first_sample_due_in_s
TOKEN_SERVICE = token_server_pb2.DESCRIPTOR.services_by_name["TokenService"].full_name


def _per_stream_load(status: token_server_pb2.GetStatusResponse | None, sent_since_poll: int) -> float:
    """Work per stream a server can hold at real time (its capacity, or its slots
    before it reports one), counting the calls sent there since its last poll."""
    if status is None:
        return float(sent_since_poll)
    work = status.slots_busy + status.queue_depth + sent_since_poll
    room = status.capacity_streams or status.slots_total
    return work / room if room else float(work)


class Router:
    def __init__(
        self,
        addresses: tuple[str, ...],
        status_interval_s: float = 0.25,
        security: ChannelSecurity = ChannelSecurity(),
        stall: StallPolicy = GATEWAY_STALL,
    ) -> None:
        # A name may stand for many token servers (a headless Service): route over
        # every address it resolves to, as they come and go.
        self._servers: PeerPool[token_server_pb2.GetStatusResponse] = PeerPool(
            EndpointSet(addresses, security), self._status_of, self._load_of,
            kind="token server", interval_s=status_interval_s, on_polled=self._polled,
        )
        self._sent_since_poll: collections.Counter[str] = collections.Counter()
        self._turn = 0  # round-robin among equally loaded servers
        self._stall = stall
        # Told after every poll whether any server is reachable and SERVING (available()).
        self.on_availability: Callable[[bool], Awaitable[None]] | None = None

    async def start(self) -> None:
        """Resolves and polls once (so the first requests are routed on facts), then keeps polling."""
        await self._servers.start()

    async def close(self) -> None:
        await self._servers.close()

    def available(self) -> bool:
        """Whether a token server was reachable and SERVING at the last poll."""
        return self._servers.available()

    def ranked(self, turn: int = 0, family: str = ORPHEUS) -> list[Peer[token_server_pb2.GetStatusResponse]]:
        """Servers of `family`, least loaded first (unreachable ones last, but still
        candidates: they may be back); equally loaded ones rotated by `turn`. A server
        that has not said its family yet is a candidate for any. Reads only."""
        return [server for server in self._servers.ranked(turn)
                if server.load is None or reported_family(server.load.family) == family]

    def _load_of(self, server: Peer[token_server_pb2.GetStatusResponse]) -> tuple[bool, float]:
        return not server.reachable, _per_stream_load(server.load, self._sent_since_poll[server.address])

    def _next_turn(self) -> int:
        """Each request starts the rotation one further, so ties are shared round-robin."""
        self._turn += 1
        return self._turn

    async def generate(
        self, request: token_server_pb2.GenerateRequest, deadline: float, family: str = ORPHEUS
    ) -> AsyncIterator[token_server_pb2.GenerateResponse]:
        """Generate on the best server of `family` that takes it; `deadline` is
        time.monotonic() based."""
        if self._servers.ranked(0) and not self.ranked(0, family):  # with none at all, the usual message
            raise GatewayError(grpc.StatusCode.UNAVAILABLE,
                               f"no token server here serves {family} voices: voice {request.voice!r} cannot be spoken")
        failures: list[tuple[str, grpc.StatusCode, str]] = []
        relayed = _Relayed(request)
        for round_number in range(2):
            if round_number and (relayed.samples or not await self._wait_for_return(failures, deadline)):
                break
            for attempt_number, server in enumerate(self.ranked(self._next_turn(), family), start=len(failures)):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise GatewayError(
                        grpc.StatusCode.DEADLINE_EXCEEDED, "the request's deadline passed before generation started"
                    )
                self._sent_since_poll[server.address] += 1
                attempt = relayed.replay(time.monotonic()) if relayed.replayable else request
                relayed.sending(time.monotonic())
                # A retry's CLIENT span says so, and which servers refused before it.
                with tracing.call_attributes(**_retry_attributes(attempt_number, failures, attempt is not request)):
                    call = self._stub(server.address).Generate(attempt, timeout=remaining)
                responded = False
                try:
                    responses = watched(
                        call, lambda: relayed.hung_at(self._stall), f"token server {server.address}"
                    )
                    if attempt is not request:
                        relayed.check_replay(await anext(responses, None), server.address)
                    async for response in responses:
                        responded = True
                        relayed.note(response)
                        yield response
                    return
                except _Diverged as err:
                    log.warning("%s", err)
                    failures.append((server.address, grpc.StatusCode.UNAVAILABLE, str(err)))
                except grpc.aio.AioRpcError as err:
                    if err.code() == grpc.StatusCode.UNAVAILABLE:
                        self._servers.mark_unreachable(server.address)
                    if relayed.replayable and err.code() in RETRYABLE | FAILOVER:
                        log.warning("token server %s failed %s at sample %d (%s: %s); replaying on another",
                                    server.address, request.request_id, relayed.samples, err.code().name, err.details())
                    elif responded or err.code() not in RETRYABLE:
                        raise _relayed(server.address, err) from None
                    else:
                        log.warning("token server %s refused %s (%s: %s); trying another",
                                    server.address, request.request_id, err.code().name, err.details())
                    failures.append((server.address, err.code(), err.details()))
                finally:
                    call.cancel()  # no-op once finished; frees the slot if our consumer went away
        raise _exhausted(failures, relayed.samples)

    async def encode_reference(
        self, request: token_server_pb2.EncodeReferenceRequest, family: str, deadline: float
    ) -> common_pb2.ReferenceCodes:
        """The reference's codes, from the best server of `family` that answers: one
        unreachable or busy gives way to the next; a refusal of the recording itself
        is final (every server would refuse it alike)."""
        if not self.ranked(0, family):
            raise GatewayError(grpc.StatusCode.UNAVAILABLE,
                               f"no token server here serves {family} voices, so none can encode the reference")
        failures: list[tuple[str, grpc.StatusCode, str]] = []
        for server in self.ranked(self._next_turn(), family):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise GatewayError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                   "the request's deadline passed before the reference was encoded")
            try:
                reply = await self._stub(server.address).EncodeReference(request, timeout=remaining)
                return reply.codes
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.UNAVAILABLE:
                    self._servers.mark_unreachable(server.address)
                if err.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED):
                    raise _relayed(server.address, err) from None
                failures.append((server.address, err.code(), err.details()))
        raise _exhausted(failures, 0)

    async def _wait_for_return(self, failures: list, deadline: float) -> bool:
        """After every server refused the call as unreachable, before any of its audio
        was relayed: whether one came back within a brief wait (inside the deadline),
        so that the call tries again."""
        if not failures or any(code != grpc.StatusCode.UNAVAILABLE for _, code, _ in failures):
            return False
        return await self._servers.wait_for_room(min(deadline - time.monotonic(), PEER_RETURN_WAIT_S)) is not None

    def _stub(self, address: str) -> token_server_pb2_grpc.TokenServiceStub:
        return token_server_pb2_grpc.TokenServiceStub(self._servers.endpoints.channel(address))

    async def _status_of(self, address: str) -> token_server_pb2.GetStatusResponse:
        status, serving = await asyncio.gather(
            self._stub(address).GetStatus(token_server_pb2.GetStatusRequest(), timeout=STATUS_TIMEOUT_S),
            self._servers.endpoints.serving(address, TOKEN_SERVICE, STATUS_TIMEOUT_S),
        )
        self._sent_since_poll[address] = 0  # the status counts them now
        if not serving:
            raise NotServing("not serving")
        return status

    async def _polled(self) -> None:
        if self.on_availability is not None:
            await self.on_availability(self.available())


def _retry_attributes(
    attempt: int, failures: list[tuple[str, grpc.StatusCode, str]], replay: bool
) -> dict[str, object]:
    if not attempt:
        return {}
    attributes = {
        "chorus.retry": True,
        "chorus.attempt": attempt + 1,
        "chorus.refused_by": [f"{address}: {code.name}" for address, code, _ in failures],
    }
    if replay:
        attributes["chorus.failover"] = True  # mid-stream: a replay from the last relayed sample
    return attributes


def _relayed(address: str, err: grpc.aio.AioRpcError) -> GatewayError:
    """A token server's status, passed on with where it came from."""
    if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        return GatewayError(
            err.code(), "the request's deadline passed during generation; set a longer deadline for long texts"
        )
    return GatewayError(err.code(), f"token server {address}: {err.details()}")


def _exhausted(failures: list[tuple[str, grpc.StatusCode, str]], relayed_samples: int) -> GatewayError:
    seen = "; ".join(f"{address}: {code.name} ({details})" for address, code, details in failures)
    if relayed_samples:
        return GatewayError(
            grpc.StatusCode.UNAVAILABLE,
            f"generation failed after {relayed_samples} samples and no token server could continue it exactly "
            f"(the audio ends there; nothing else was played): {seen}",
        )
    if not failures:  # all([]) would say "at capacity" of servers that do not exist
        return GatewayError(
            grpc.StatusCode.UNAVAILABLE,
            "no token server is resolved or reachable yet; check the gateway's --token-servers and retry",
        )
    if all(code == grpc.StatusCode.RESOURCE_EXHAUSTED for _, code, _ in failures):
        return GatewayError(
            grpc.StatusCode.RESOURCE_EXHAUSTED, f"every token server is at capacity, retry with backoff: {seen}"
        )
    return GatewayError(grpc.StatusCode.UNAVAILABLE, f"no token server could take the request: {seen}")


class _Diverged(Exception):
    """A replay regenerated other codes than those whose audio was relayed."""


class _Relayed:
    """What one generation has relayed so far: where a replay resumes and which codes
    it must regenerate. A seeded request regenerates the same codes on any server
    with the same model file and bit-identical kernels, and the codec's output is a
    function of codes and seed, so a replay continues the audio sample for sample;
    the running code digest (tts.v1.CodeDigest) proves it before any audio of the
    replay is taken."""

    def __init__(self, request: token_server_pb2.GenerateRequest) -> None:
        self._request = request
        self._seeded = request.HasField("sampling") and request.sampling.HasField("seed")
        self.samples = 0
        self.codes: token_server_pb2.CodeDigest | None = None
        self._sent_at: float | None = None  # of the first attempt
        self._first_audio_at: float | None = None
        self._heard_at: float | None = None  # the current attempt's last audio

    @property
    def replayable(self) -> bool:
        """Audio was relayed, and a replay can regenerate it and be checked."""
        return self._seeded and self.samples > 0 and self.codes is not None

    def sending(self, now: float) -> None:
        if self._sent_at is None:
            self._sent_at = now
        self._heard_at = None  # the new attempt has sent no audio yet

    def note(self, response: token_server_pb2.GenerateResponse) -> None:
        if response.HasField("audio"):
            self._heard_at = time.monotonic()
            if self._first_audio_at is None:
                self._first_audio_at = self._heard_at
            chunk = response.audio
            self.samples = max(self.samples, chunk.sample_offset + len(chunk.pcm) // 2)
            if response.HasField("codes"):
                self.codes = response.codes

    def replay(self, now: float) -> token_server_pb2.GenerateRequest:
        request = token_server_pb2.GenerateRequest()
        request.CopyFrom(self._request)
        request.resume_from_sample = self.samples
        request.verify_frames = self.codes.frames
        # The schedule moves to the resume sample.
        due_in = self._due_at(self.samples) - now
        request.playback.first_sample_due_in_s = min(max(due_in, -MAX_DUE_IN_S), MAX_DUE_IN_S)
        return request

    def hung_at(self, stall: StallPolicy) -> float | None:
        """When the current attempt's server, silent since its last audio, is taken for
        hung; None before its first audio."""
        if self._heard_at is None:
            return None
        return stall.hung_at(self._heard_at, self._due_at(self.samples))

    def _due_at(self, sample: int) -> float:
        """When the listener needs `sample`, by the first attempt's schedule (or its clock,
        started at its first audio), stalls aside. Only once that schedule exists: the
        request carried one, or audio came."""
        playback = self._request.playback
        if playback.HasField("first_sample_due_in_s"):
            zero_due = self._sent_at + playback.first_sample_due_in_s
        else:
            zero_due = self._first_audio_at + (playback.start_buffer_s or DEFAULT_START_BUFFER_S)
        return zero_due + sample / orpheus.SAMPLE_RATE

    def check_replay(self, first: token_server_pb2.GenerateResponse | None, address: str) -> None:
        if first is None or first.WhichOneof("payload") is not None or not first.HasField("codes"):
            raise _Diverged(f"token server {address} did not open its replay with the codes' digest")
        if first.codes != self.codes:
            raise _Diverged(
                f"token server {address} regenerated different codes for {self._request.request_id} "
                f"({first.codes.frames} frames, digest {first.codes.digest:016x}; relayed {self.codes.frames} frames, "
                f"digest {self.codes.digest:016x}): another model file, or kernels that round differently"
            )
