"""Relays one request's code frames to a codec worker and its PCM back.

A stream opens its codec worker only when its first frame exists: a request waiting
for a slot holds nothing downstream. The token server picks the least-loaded worker of
its pool, opens a bidirectional Decode stream, writes frames as the engine completes
them and reads PCM as the worker produces it. If the worker fails mid-stream, the
relay resumes on another worker from the last sample it relayed: it resends the frames
from `DECODER_LOOKAHEAD_FRAMES` before that point (the decoder's reach is 2.32 frames,
so that much context makes the resumed samples the same as if nothing had happened,
to the last bit: the decoder is bit-exact across a resume and its noise is keyed by
the request's seed and sample position) and the new worker drops the samples already
relayed. No admitted stream loses audio, and none hears a seam. A worker that hangs
(stopped, wedged) ends no call, so each Decode call is watched (chorus.rpc.stall): a
worker that owes audio (frames past the decoder's lookahead, or the tail) and sends
none for CODEC_STALL's floor, or until the listener's lead is down to its margin,
is taken for dead and the stream resumes on another worker the same way.

Each Decode stream carries the listener's playback schedule (DecodeStart.playback) so
that the worker can serve the least-ahead streams first.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable, Sequence

import grpc

from chorus.proto.tts.v1 import codec_pb2, codec_pb2_grpc, common_pb2
from chorus.realtime.playback import PlaybackClock
from chorus.rpc.discovery import PEER_RETURN_WAIT_S, EndpointSet
from chorus.rpc.stall import CODEC_STALL, StallPolicy, watched
from chorus.security.tls import ChannelSecurity
from chorus.speech import orpheus
from chorus.telemetry import tracing

log = logging.getLogger(__name__)

# Failures that a different worker can cure; anything else is the request's fault.
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.CANCELLED,
}
FAILED_WORKER_COOLDOWN_S = 5.0
LOAD_POLL_INTERVAL_S = 0.5
# Admission waits this long for a codec worker to come back before it refuses a
# request as UNAVAILABLE (which sends it to another token server).
WORKER_RETURN_WAIT_S = 1.5
LOAD_POLL_TIMEOUT_S = 1.0


class NoCodecWorkerError(Exception):
    """No codec worker is configured or reachable."""


@dataclass
class WorkerLoad:
    """What a worker last said about itself, and this server's streams on it then."""

    reachable: bool = False
    max_streams: int = 0
    capacity_streams: int = 0
    open_streams: int = 0
    ours_when_polled: int = 0
    lag_seconds: float = 0.0
    numeric_mode: str = ""  # "" until the worker said

    def room_for_us(self) -> int:
        """Streams this server may hold on the worker: its real-time capacity (never
        above its stream cap) minus what other token servers hold there."""
        if not self.reachable:
            return 0
        cap = min(self.max_streams, self.capacity_streams or self.max_streams)
        others = max(0, self.open_streams - self.ours_when_polled)
        return max(0, cap - others)


class CodecPool:
    """The codec workers this token server may use, with their load.

    Workers are the endpoints behind the configured addresses (a headless Service
    resolves to every pod). Each is asked for its load (GetLoad) in the background;
    together with the streams this server opened since, that gives the codec streams
    admission may count on (`streams_limit`). Least in-flight streams wins a new
    stream; a worker that just failed sits out a cooldown so that new streams avoid it
    while Kubernetes replaces it.
    `on_availability` hears after each poll whether any worker answers (the token
    server's own health).
    """

    def __init__(self, addresses: Sequence[str], security: ChannelSecurity = ChannelSecurity()) -> None:
        self.endpoints = EndpointSet(addresses, security)
        self._in_flight: collections.Counter[str] = collections.Counter()
        # Most streams held on each worker since its poll began: what the worker may have
        # counted as ours (see _poll_one).
        self._in_flight_peak: collections.Counter[str] = collections.Counter()
        self._open_total = 0  # the sum of _in_flight, one int for the engine thread to read
        self._failed_at: dict[str, float] = {}
        self._loads: dict[str, WorkerLoad] = {}
        self._limit = 0
        self._poller: asyncio.Task | None = None
        self.on_availability: Callable[[bool], Awaitable[None]] | None = None

    async def start(self) -> None:
        await self.endpoints.start()
        await self.poll()
        self._poller = asyncio.create_task(self._poll_forever(), name="codec-load")

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
            return "this token server has no codec workers (--codec-workers is empty or does not resolve)"
        if not any(self._loads.get(w, WorkerLoad()).reachable for w in workers):
            return f"this token server reaches none of its codec workers ({', '.join(workers)}); try another"
        return None

    async def poll(self) -> None:
        workers = self.endpoints.endpoints()
        await asyncio.gather(*(self._poll_one(w) for w in workers))
        self._limit = sum(self._loads[w].room_for_us() for w in workers if w in self._loads)
        if self.on_availability is not None:
            await self.on_availability(self.available())

    def available(self) -> bool:
        """A codec worker answered the last poll, or none is configured (a token server
        without codec workers serves codes only)."""
        return not self.endpoints.targets or self.unavailable_reason() is None

    async def wait_for_return(self, timeout_s: float) -> bool:
        """When no worker answered the last poll: whether one answers after a brief wait
        for a channel to be ready (a restarted worker is found at its channel's next
        reconnect, within a second), polling again then."""
        if not await self.wait_for_a_worker(min(timeout_s, WORKER_RETURN_WAIT_S)):
            return False
        await self.poll()
        return self.unavailable_reason() is None

    async def wait_for_a_worker(self, timeout_s: float) -> bool:
        """Waits up to `timeout_s` for a worker's channel to be ready (one coming back)."""
        return await self.endpoints.wait_until_any_ready(min(timeout_s, PEER_RETURN_WAIT_S))

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(LOAD_POLL_INTERVAL_S)
            try:
                await self.poll()
            except Exception:  # a bad reply must not stop admission from learning
                log.exception("polling codec worker load failed")

    async def _poll_one(self, address: str) -> None:
        load = self._loads.setdefault(address, WorkerLoad())
        stub = codec_pb2_grpc.CodecServiceStub(self.endpoints.channel(address))
        # A stream we open while the poll is on its way, or close while the worker has
        # yet to see it go, is in the worker's count: counted as another server's, it
        # took our own seat until the next poll (a request waited 0.5 s with N* streams
        # held). So ours is the most we held during the poll.
        self._in_flight_peak[address] = self._in_flight[address]
        try:
            reply = await stub.GetLoad(codec_pb2.GetLoadRequest(), timeout=LOAD_POLL_TIMEOUT_S)
        except grpc.aio.AioRpcError as err:
            if load.reachable:
                log.warning("codec worker %s is unreachable: %s", address, err.code().name)
            load.reachable = False
            return
        load.reachable = True
        load.max_streams = reply.max_streams
        load.capacity_streams = reply.capacity_streams
        load.open_streams = reply.open_streams
        load.ours_when_polled = max(self._in_flight_peak[address], self._in_flight[address])
        load.lag_seconds = reply.lag_seconds
        load.numeric_mode = reply.numeric_mode

    def numeric_mode(self, address: str) -> str:
        """The numeric mode `address` last reported ("" when unknown)."""
        return self._loads.get(address, WorkerLoad()).numeric_mode

    def pick(self, exclude: set[str] = frozenset(), numeric_mode: str = "") -> str:
        """The least-loaded worker, not in `exclude`; with `numeric_mode`, only workers
        that reported that mode (a stream resumes only where it decodes to the same bits)."""
        workers = self.endpoints.endpoints()
        if not workers:
            raise NoCodecWorkerError(
                "this token server has no codec workers (--codec-workers is empty or does not resolve)"
            )
        now = time.monotonic()
        candidates = [w for w in workers if w not in exclude]
        if numeric_mode:
            others = candidates
            candidates = [w for w in candidates if self.numeric_mode(w) == numeric_mode]
            if others and not candidates:
                raise NoCodecWorkerError(
                    f"no other codec worker decodes in numeric mode {numeric_mode} (those left report "
                    f"{', '.join(sorted({self.numeric_mode(w) or 'nothing yet' for w in others}))}); a stream "
                    "resumes only on a worker that gives its audio the same bits"
                )
        healthy = [w for w in candidates if now - self._failed_at.get(w, -1e9) > FAILED_WORKER_COOLDOWN_S]
        serving = [w for w in healthy if self._loads.get(w, WorkerLoad()).reachable]
        pool = serving or healthy or candidates
        if not pool:
            raise NoCodecWorkerError(f"every codec worker failed for this stream: {', '.join(sorted(exclude))}")
        return min(pool, key=lambda w: (self._in_flight[w], workers.index(w)))

    def open(self, address: str) -> grpc.aio.StreamStreamCall:
        self._in_flight[address] += 1
        self._in_flight_peak[address] = max(self._in_flight_peak[address], self._in_flight[address])
        self._open_total += 1
        stub = codec_pb2_grpc.CodecServiceStub(self.endpoints.channel(address))
        return stub.Decode()

    def release(self, address: str) -> None:
        self._in_flight[address] -= 1
        self._open_total -= 1

    def mark_failed(self, address: str) -> None:
        self._failed_at[address] = time.monotonic()

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        await self.endpoints.close()


def _failover_attributes(failed: set[str], resume_from_sample: int) -> dict[str, object]:
    if not failed:
        return {}
    return {
        "chorus.failover": True,
        "chorus.failed_workers": sorted(failed),
        "chorus.resume_from_sample": resume_from_sample,
    }


class CodecRelay:
    """Frames in (push/finish), PCM out (audio), across worker failures."""

    def __init__(
        self,
        pool: CodecPool,
        request_id: str,
        clock: PlaybackClock,
        deterministic: bool = False,
        max_attempts: int = 3,
        seed: int = 0,
        resume_from_sample: int = 0,  # samples before it were relayed by an earlier attempt
        deadline: float | None = None,  # time.monotonic() of the request's deadline
        stall: StallPolicy = CODEC_STALL,
    ) -> None:
        self._pool = pool
        self._deadline = deadline
        self._request_id = request_id
        self._clock = clock
        self._deterministic = deterministic
        self._seed = seed
        self._max_attempts = max_attempts
        self._frames: list[tuple[int, ...]] = []
        self._finished = False
        self._stall = stall
        self._sent = 0  # frames written to the current worker, counted from frame 0
        self._owed_since: float | None = None  # since when the current worker owes audio
        self._changed = asyncio.Event()
        self.relayed_samples = resume_from_sample
        # The mode of the worker that first decoded this stream; a failover stays in it.
        self._numeric_mode = ""

    def push(self, codes: tuple[int, ...]) -> None:
        self._frames.append(codes)
        self._changed.set()

    def finish(self) -> None:
        self._finished = True
        self._changed.set()

    async def audio(self) -> AsyncIterator[common_pb2.PcmChunk]:
        """PCM chunks with absolute sample offsets, contiguous from 0, until the tail."""
        # Hold nothing downstream before there is audio to make: the first frame, or on
        # a replay the first frame of the resumed decode's context.
        first_needed = max(0, self.relayed_samples // orpheus.SAMPLES_PER_FRAME - orpheus.DECODER_LOOKAHEAD_FRAMES)
        while len(self._frames) <= first_needed:
            if self._finished:
                return
            self._changed.clear()
            await self._changed.wait()
        failed: set[str] = set()
        attempts = 0
        while True:
            try:
                address = self._pool.pick(failed, self._numeric_mode)
            except NoCodecWorkerError:
                # Every worker failed this stream: one may be restarting. Wait briefly
                # for one to come back rather than fail while its channel reconnects.
                if not failed or attempts >= self._max_attempts or not await self._pool.wait_for_a_worker(
                    self._time_left()
                ):
                    raise
                failed.clear()
                address = self._pool.pick(failed, self._numeric_mode)
            self._numeric_mode = self._numeric_mode or self._pool.numeric_mode(address)
            attempts += 1
            first_frame = max(0, self.relayed_samples // orpheus.SAMPLES_PER_FRAME - orpheus.DECODER_LOOKAHEAD_FRAMES)
            # A resumed stream's CLIENT span says so: the failover is its own span in the trace.
            with tracing.call_attributes(**_failover_attributes(failed, self.relayed_samples)):
                call = self._pool.open(address)
            self._sent = first_frame
            writer = asyncio.create_task(self._write(call, first_frame))
            # A failed write surfaces through the read side; don't log it twice.
            writer.add_done_callback(lambda t: t.cancelled() or t.exception())
            try:
                tail = False
                # To the end of the stream, not just to its tail: a call read to its
                # end has its status, and its CLIENT span ends then, not when the
                # garbage collector gets to it.
                self._owed_since = None
                async for response in watched(call, self._hung_at, f"codec worker {address}"):
                    if response.audio.pcm or response.final:
                        self._owed_since = None  # it answered: owed anew from the next check
                    chunk = self._unseen_part(response.audio)
                    if chunk is not None:
                        self.relayed_samples += len(chunk.pcm) // 2
                        yield chunk
                    tail = tail or response.final
                if tail:
                    return
                raise grpc.aio.AioRpcError(
                    grpc.StatusCode.UNAVAILABLE, None, None, f"codec worker {address} ended the stream without its tail"
                )
            except grpc.aio.AioRpcError as err:
                if err.code() not in RETRYABLE or attempts >= self._max_attempts:
                    raise
                log.warning(
                    "codec worker %s failed for %s at sample %d (%s: %s); resuming on another worker",
                    address, self._request_id, self.relayed_samples, err.code().name, err.details(),
                )
                self._pool.mark_failed(address)
                failed.add(address)
            finally:
                writer.cancel()
                call.cancel()
                self._pool.release(address)

    def _hung_at(self) -> float | None:
        """When the current worker, owing audio and sending none, is taken for hung;
        None while it owes none. It owes audio once it holds frames past the decoder's
        lookahead beyond the samples relayed, or every frame and the end of input (the tail)."""
        decodable = (self._sent - orpheus.DECODER_LOOKAHEAD_FRAMES) * orpheus.SAMPLES_PER_FRAME
        done_writing = self._finished and self._sent >= len(self._frames)
        if decodable <= self.relayed_samples and not done_writing:
            self._owed_since = None
            return None
        if self._owed_since is None:
            self._owed_since = time.monotonic()
        return self._stall.hung_at(self._owed_since, self._clock.due_at(self.relayed_samples))

    def _time_left(self) -> float:
        return PEER_RETURN_WAIT_S if self._deadline is None else self._deadline - time.monotonic()

    def _unseen_part(self, chunk: common_pb2.PcmChunk) -> common_pb2.PcmChunk | None:
        """Drops samples already relayed (a resumed worker may repeat a few)."""
        n = len(chunk.pcm) // 2
        skip = self.relayed_samples - chunk.sample_offset
        if skip < 0:
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.INTERNAL, None, None,
                f"codec worker skipped samples {self.relayed_samples}..{chunk.sample_offset}",
            )
        if skip >= n:
            return None
        if skip == 0:
            return chunk
        return common_pb2.PcmChunk(
            sample_offset=self.relayed_samples, pcm=chunk.pcm[2 * skip :], sample_rate_hz=chunk.sample_rate_hz
        )

    def _playback(self) -> common_pb2.PlaybackClock:
        """The schedule from the sample the worker will resume at."""
        playback = common_pb2.PlaybackClock(start_buffer_s=self._clock.start_buffer_s)
        due_in = self._clock.due_in(self.relayed_samples, time.monotonic())
        if due_in is not None:
            playback.first_sample_due_in_s = due_in
        return playback

    async def _write(self, call: grpc.aio.StreamStreamCall, first_frame: int) -> None:
        start = codec_pb2.DecodeStart(
            request_id=self._request_id,
            first_frame_index=first_frame,
            resume_from_sample=self.relayed_samples,
            deterministic=self._deterministic,
            seed=self._seed,
            playback=self._playback(),
        )
        await call.write(codec_pb2.DecodeRequest(start=start))
        while True:
            self._changed.clear()
            if self._sent < len(self._frames):
                pending = self._frames[self._sent:]
                flat = [code for frame in pending for code in frame]
                await call.write(
                    codec_pb2.DecodeRequest(frames=common_pb2.CodeFrames(first_frame_index=self._sent, codes=flat))
                )
                self._sent += len(pending)
                continue
            if self._finished:
                await call.done_writing()
                return
            await self._changed.wait()
