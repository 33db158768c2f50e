"""Relays one request's code frames to a codec worker and its PCM back.

The token server picks the least-loaded worker of its pool, opens a bidirectional
Decode stream, writes frames as the engine completes them and reads PCM as the
worker produces it. If the worker fails mid-stream, the relay resumes on another
worker from the last sample it relayed: it resends the frames from a few frames
before that point (the decoder's reach is 2.32 frames, so 3 frames of context make
the resumed samples the same as if nothing had happened, noise aside) and the new
worker drops the samples already relayed. No admitted stream loses audio.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import AsyncIterator, Sequence

import grpc

from chorus import orpheus
from chorus.discovery import EndpointSet
from chorus.tls import ChannelSecurity
from chorus.proto.tts.v1 import codec_pb2, codec_pb2_grpc, common_pb2

log = logging.getLogger(__name__)

RESUME_CONTEXT_FRAMES = 3
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


class NoCodecWorkerError(Exception):
    """No codec worker is configured or reachable."""


class CodecPool:
    """The codec workers this token server may use, with their in-flight streams.

    Workers are the endpoints behind the configured addresses (a headless Service
    resolves to every pod). Least in-flight streams wins; a worker that just failed
    sits out a cooldown so that new streams avoid it while Kubernetes replaces it.
    """

    def __init__(self, addresses: Sequence[str], security: ChannelSecurity = ChannelSecurity()) -> None:
        self.endpoints = EndpointSet(addresses, security)
        self._in_flight: collections.Counter[str] = collections.Counter()
        self._failed_at: dict[str, float] = {}

    async def start(self) -> None:
        await self.endpoints.start()

    def pick(self, exclude: set[str] = frozenset()) -> str:
        workers = self.endpoints.endpoints()
        if not workers:
            raise NoCodecWorkerError(
                "this token server has no codec workers (--codec-workers is empty or does not resolve)"
            )
        now = time.monotonic()
        candidates = [w for w in workers if w not in exclude]
        healthy = [w for w in candidates if now - self._failed_at.get(w, -1e9) > FAILED_WORKER_COOLDOWN_S]
        pool = healthy or candidates
        if not pool:
            raise NoCodecWorkerError(f"every codec worker failed for this stream: {', '.join(sorted(exclude))}")
        return min(pool, key=lambda w: (self._in_flight[w], workers.index(w)))

    def open(self, address: str, metadata: Sequence[tuple[str, str]] = ()) -> grpc.aio.StreamStreamCall:
        self._in_flight[address] += 1
        stub = codec_pb2_grpc.CodecServiceStub(self.endpoints.channel(address))
        return stub.Decode(metadata=tuple(metadata))

    def release(self, address: str) -> None:
        self._in_flight[address] -= 1

    def mark_failed(self, address: str) -> None:
        self._failed_at[address] = time.monotonic()

    async def close(self) -> None:
        await self.endpoints.close()


class CodecRelay:
    """Frames in (push/finish), PCM out (audio), across worker failures."""

    def __init__(
        self,
        pool: CodecPool,
        request_id: str,
        deterministic: bool = False,
        metadata: Sequence[tuple[str, str]] = (),
        max_attempts: int = 3,
    ) -> None:
        self._pool = pool
        self._request_id = request_id
        self._deterministic = deterministic
        self._metadata = metadata
        self._max_attempts = max_attempts
        self._frames: list[tuple[int, ...]] = []
        self._finished = False
        self._changed = asyncio.Event()
        self.relayed_samples = 0
        self.workers: list[str] = []

    def push(self, codes: tuple[int, ...]) -> None:
        self._frames.append(codes)
        self._changed.set()

    def finish(self) -> None:
        self._finished = True
        self._changed.set()

    async def audio(self) -> AsyncIterator[common_pb2.PcmChunk]:
        """PCM chunks with absolute sample offsets, contiguous from 0, until the tail."""
        failed: set[str] = set()
        while True:
            address = self._pool.pick(failed)
            self.workers.append(address)
            first_frame = max(0, self.relayed_samples // orpheus.SAMPLES_PER_FRAME - RESUME_CONTEXT_FRAMES)
            call = self._pool.open(address, self._metadata)
            writer = asyncio.create_task(self._write(call, first_frame))
            # A failed write surfaces through the read side; don't log it twice.
            writer.add_done_callback(lambda t: t.cancelled() or t.exception())
            try:
                async for response in call:
                    chunk = self._unseen_part(response.audio)
                    if chunk is not None:
                        self.relayed_samples += len(chunk.pcm) // 2
                        yield chunk
                    if response.final:
                        return
                raise grpc.aio.AioRpcError(
                    grpc.StatusCode.UNAVAILABLE, None, None, f"codec worker {address} ended the stream without its tail"
                )
            except grpc.aio.AioRpcError as err:
                if err.code() not in RETRYABLE or len(failed) + 1 >= self._max_attempts:
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

    async def _write(self, call: grpc.aio.StreamStreamCall, first_frame: int) -> None:
        start = codec_pb2.DecodeStart(
            request_id=self._request_id,
            first_frame_index=first_frame,
            resume_from_sample=self.relayed_samples,
            deterministic=self._deterministic,
        )
        await call.write(codec_pb2.DecodeRequest(start=start))
        sent = first_frame
        while True:
            self._changed.clear()
            if sent < len(self._frames):
                pending = self._frames[sent:]
                flat = [code for frame in pending for code in frame]
                await call.write(
                    codec_pb2.DecodeRequest(frames=common_pb2.CodeFrames(first_frame_index=sent, codes=flat))
                )
                sent += len(pending)
                continue
            if self._finished:
                await call.done_writing()
                return
            await self._changed.wait()
