"""Relays one request's code frames to a codec worker and its PCM back.

A stream opens its codec worker only when its first frame exists: a request waiting
for a slot holds nothing downstream. The token server picks the least-loaded worker of
its pool (codec_pool.py), opens a bidirectional Decode stream, writes frames as the
engine completes them and reads PCM as the worker produces it. If the worker fails mid-stream, the
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
import logging
import time
from typing import AsyncIterator

import grpc

from chorus.proto.tts.v1 import codec_pb2, common_pb2
from chorus.realtime.playback import PlaybackClock
from chorus.rpc.discovery import PEER_RETURN_WAIT_S
from chorus.rpc.stall import CODEC_STALL, StallPolicy, watched
from chorus.speech import orpheus
from chorus.speech.family import SpeechFamily
from chorus.telemetry import tracing
from services.token_server.codec_pool import CodecPool, NoCodecWorkerError

log = logging.getLogger(__name__)

# Failures that a different worker can cure; anything else is the request's fault.
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.CANCELLED,
    # The worker does not decode this stream's codec (one restarted with another model
    # at the same address since the last poll): another worker that lists it can.
    grpc.StatusCode.FAILED_PRECONDITION,
}


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
        family: SpeechFamily = orpheus.FAMILY,
    ) -> None:
        self._family = family
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
        first_needed = self._first_frame()
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
            first_frame = self._first_frame()
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

    def _first_frame(self) -> int:
        """The first frame a (re)started decode needs: the decoder's lookahead before the
        first sample not yet relayed."""
        family = self._family
        if family.resume_from_start:
            return 0
        return max(0, self.relayed_samples // family.samples_per_frame - family.decoder_lookahead_frames)

    def _hung_at(self) -> float | None:
        """When the current worker, owing audio and sending none, is taken for hung;
        None while it owes none. It owes audio once it holds frames past the decoder's
        lookahead beyond the samples relayed, or every frame and the end of input (the tail)."""
        decodable = (self._sent - self._family.decoder_lookahead_frames) * self._family.samples_per_frame
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
            codec=self._pool.codec,
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
