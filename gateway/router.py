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
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import grpc

from chorus.realtime.playback import DEFAULT_START_BUFFER_S
from chorus.rpc.stall import GATEWAY_STALL, StallPolicy, watched
from chorus.speech import orpheus
from chorus.telemetry import tracing

from chorus.proto.tts.v1 import token_server_pb2, token_server_pb2_grpc
from chorus.rpc.discovery import PEER_RETURN_WAIT_S, EndpointSet
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


@dataclass
class _Server:
    address: str
    channel: grpc.aio.Channel
    stub: token_server_pb2_grpc.TokenServiceStub
    slots_total: int = 0
    capacity_streams: int = 0
    slots_busy: int = 0
    queue_depth: int = 0
    reachable: bool = True  # and SERVING; optimistic until a poll or a call says otherwise
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
        self,
        addresses: tuple[str, ...],
        status_interval_s: float = 0.25,
        security: ChannelSecurity = ChannelSecurity(),
        stall: StallPolicy = GATEWAY_STALL,
    ) -> None:
        # A name may stand for many token servers (a headless Service): route over
        # every address it resolves to, as they come and go.
        self._endpoints = EndpointSet(addresses, security)
        self._servers: list[_Server] = []
        self._interval = status_interval_s
        self._poller: asyncio.Task | None = None
        self._turn = 0  # round-robin among equally loaded servers
        self._stall = stall
        # Told after every poll whether any server is reachable and SERVING (available()).
        self.on_availability: Callable[[bool], Awaitable[None]] | None = None

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
        if self.on_availability is not None:
            await self.on_availability(self.available())

    def available(self) -> bool:
        """Whether a token server was reachable and SERVING at the last poll."""
        return any(s.reachable for s in self._servers)

    def _new_server(self, address: str) -> _Server:
        channel = self._endpoints.channel(address)
        return _Server(address, channel, token_server_pb2_grpc.TokenServiceStub(channel))

    def ranked(self, turn: int = 0) -> list[_Server]:
        """Servers, least loaded first; equally loaded ones rotated by `turn`. Reads only."""
        n = len(self._servers)
        if n == 0:
            return []  # nothing resolved yet: generate() reports UNAVAILABLE
        rotated = [self._servers[(turn + i) % n] for i in range(n)]
        return sorted(rotated, key=_Server.load)  # stable: equals keep the rotation

    def _next_turn(self) -> int:
        """Each request starts the rotation one further, so ties are shared round-robin."""
        self._turn += 1
        return self._turn

    async def generate(
        self, request: token_server_pb2.GenerateRequest, deadline: float
    ) -> AsyncIterator[token_server_pb2.GenerateResponse]:
        """Generate on the best server that takes it; `deadline` is time.monotonic() based."""
        failures: list[tuple[str, grpc.StatusCode, str]] = []
        relayed = _Relayed(request)
        for round_number in range(2):
            if round_number and (relayed.samples or not await self._wait_for_return(failures, deadline)):
                break
            for attempt_number, server in enumerate(self.ranked(self._next_turn()), start=len(failures)):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise GatewayError(
                        grpc.StatusCode.DEADLINE_EXCEEDED, "the request's deadline passed before generation started"
                    )
                server.sent_since_poll += 1
                attempt = relayed.replay(time.monotonic()) if relayed.replayable else request
                relayed.sending(time.monotonic())
                # A retry's CLIENT span says so, and which servers refused before it.
                with tracing.call_attributes(**_retry_attributes(attempt_number, failures, attempt is not request)):
                    call = server.stub.Generate(attempt, timeout=remaining)
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
                        server.reachable = False
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

    async def _wait_for_return(self, failures: list, deadline: float) -> bool:
        """After every server refused the call as unreachable, before any of its audio
        was relayed: whether one came back within a brief wait (inside the deadline),
        so that the call tries again."""
        if not failures or any(code != grpc.StatusCode.UNAVAILABLE for _, code, _ in failures):
            return False
        return await self._endpoints.wait_until_any_ready(min(deadline - time.monotonic(), PEER_RETURN_WAIT_S))

    async def _poll_forever(self) -> None:
        # A poll that fails in a way _poll_one does not expect must not end polling: a
        # router that stops polling never sees a restarted token server again.
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.poll()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("polling token servers failed; polling goes on")

    async def _poll_one(self, server: _Server) -> None:
        try:
            status, serving = await asyncio.gather(
                server.stub.GetStatus(token_server_pb2.GetStatusRequest(), timeout=STATUS_TIMEOUT_S),
                self._endpoints.serving(server.address, TOKEN_SERVICE, STATUS_TIMEOUT_S),
            )
        except grpc.aio.AioRpcError as err:
            if server.reachable:
                log.warning("token server %s is unreachable: %s", server.address, err.code().name)
            server.reachable = False
            return
        if serving != server.reachable:
            log.info("token server %s is %s", server.address, "serving again" if serving else "not serving")
        server.reachable = serving
        server.slots_total = status.slots_total
        server.capacity_streams = status.capacity_streams
        server.slots_busy = status.slots_busy
        server.queue_depth = status.queue_depth
        server.sent_since_poll = 0


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
