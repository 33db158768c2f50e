"""Long text as one gapless stream: generate the next piece while this one is relayed.

Pieces are generated ahead, at most `lookahead` beyond the one being relayed, and
relayed strictly in order, each piece's first sample right after the previous
piece's last: no silence is inserted and none is lost, so the stream's length is the
sum of what was generated. The next piece starts only once the current one has
produced audio, so it never competes with the first piece for the backbone's first
steps: the first audio of a five-minute text comes as fast as that of a sentence.

Memory is bounded by design: a piece generated ahead is buffered here until its
turn, and at most `lookahead + 1` pieces are alive at once (a piece's slot frees
when its audio has been relayed, not when its generation ends).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import numpy as np

from chorus.proto.tts.v1 import common_pb2, token_server_pb2
from chorus.realtime.playback import PlaybackClock
from chorus.speech import orpheus
from gateway.errors import GatewayError
from gateway.feed import TextFeed
from gateway.joins import JoinSmoother
from gateway.request_types import GenerationSpec
from gateway.router import Router

log = logging.getLogger(__name__)

_END = object()


@dataclass
class PipelineStats:
    pieces: int = 0
    tokens: int = 0
    frames: int = 0
    prompt_tokens: int = 0
    queue_wait_ms: float = 0.0  # the first piece's: the wait that delays first audio
    finish_reason: str = ""
    # time.monotonic() of the first token of the first piece, as seen from here.
    first_token_at: float | None = None
    # ... and of the first piece's first decodable frames (see SynthesisSummary).
    decodable_at: float | None = None

    def add(self, piece: _Piece) -> None:
        self.pieces += 1
        summary = piece.summary
        if summary is None:
            return
        if piece.index == 0:
            self.queue_wait_ms = summary.queue_wait_ms
            if piece.first_audio_at is not None:
                # The token server measures first token and first audio on its own
                # clock; their difference, taken back from when the audio reached us,
                # places the first token on ours.
                self.first_token_at = piece.first_audio_at - _lead(summary, summary.time_to_first_token_ms)
                self.decodable_at = piece.first_audio_at - _lead(summary, summary.time_to_decodable_frames_ms)
        self.tokens += summary.tokens
        self.frames += summary.frames
        self.prompt_tokens += summary.prompt_tokens
        if self.finish_reason != "max_tokens":  # any piece cut short makes the whole one so
            self.finish_reason = summary.finish_reason


def _lead(summary: common_pb2.SynthesisSummary, at_ms: float) -> float:
    """Seconds from a token-server event to its first audio, on the token server's clock."""
    return max(0.0, summary.time_to_first_audio_ms - at_ms) / 1000


def _piece_request(
    spec: GenerationSpec, index: int, text: str, listener: PlaybackClock, relayed_samples: int
) -> token_server_pb2.GenerateRequest:
    request = token_server_pb2.GenerateRequest(
        request_id=f"{spec.request_id}.{index}", text=text, voice=spec.voice,
        playback=_schedule(listener, relayed_samples),
    )
    if spec.sampling is not None:
        request.sampling.CopyFrom(spec.sampling)
        if spec.sampling.HasField("seed"):
            # Same seed, same request, same audio; but each piece its own random stream.
            request.sampling.seed = (spec.sampling.seed + index) % 2**64
    return request


def _schedule(listener: PlaybackClock, relayed_samples: int) -> common_pb2.PlaybackClock:
    """When the piece's first sample is needed. A later piece starts after the audio
    relayed so far, at the earliest (the piece before may still have more to come), so
    the token server sees it no less urgent than it is; the first piece's clock starts
    at its first audio."""
    playback = common_pb2.PlaybackClock(start_buffer_s=listener.start_buffer_s)
    due_in = listener.due_in(listener.delivered, time.monotonic())
    if due_in is not None and relayed_samples:
        playback.first_sample_due_in_s = due_in
    return playback


class _Piece:
    """One piece's generation, running ahead into a buffer until its turn to be relayed."""

    def __init__(self, router: Router, request: token_server_pb2.GenerateRequest, index: int, deadline: float,
                 family: str) -> None:
        self.index = index
        self.summary: common_pb2.SynthesisSummary | None = None
        self.first_audio_at: float | None = None
        self.started = asyncio.Event()  # first audio arrived, or the generation ended
        self._buffer: asyncio.Queue = asyncio.Queue()
        self._task = asyncio.create_task(self._pump(router, request, deadline, family),
                                         name=f"piece-{request.request_id}")

    async def _pump(self, router: Router, request: token_server_pb2.GenerateRequest, deadline: float,
                    family: str) -> None:
        try:
            async for response in router.generate(request, deadline, family):
                if response.HasField("audio") and self.first_audio_at is None:
                    self.first_audio_at = time.monotonic()
                    self.started.set()
                self._buffer.put_nowait(response)
            self._buffer.put_nowait(_END)
        except GatewayError as err:
            self._buffer.put_nowait(err)
        except Exception as err:  # a bug here must end the stream with a status, not hang it
            log.exception("piece %s failed", request.request_id)
            self._buffer.put_nowait(GatewayError(grpc.StatusCode.INTERNAL, f"piece {self.index}: {err}"))
        finally:
            self.started.set()

    async def audio(self) -> AsyncIterator[np.ndarray]:
        """The piece's PCM in order, overlaps (a codec failover resending) trimmed."""
        expected = 0
        while True:
            item = await self._buffer.get()
            if item is _END:
                return
            if isinstance(item, GatewayError):
                raise item
            if item.HasField("summary"):
                self.summary = item.summary
                continue
            if not item.HasField("audio"):
                continue
            chunk = item.audio
            if chunk.sample_rate_hz and chunk.sample_rate_hz != orpheus.SAMPLE_RATE:
                raise GatewayError(
                    grpc.StatusCode.INTERNAL,
                    f"token server sent {chunk.sample_rate_hz} Hz audio; the gateway expects {orpheus.SAMPLE_RATE}",
                )
            if chunk.sample_offset > expected:
                raise GatewayError(
                    grpc.StatusCode.DATA_LOSS,
                    f"piece {self.index}: audio skipped from sample {expected} to {chunk.sample_offset}",
                )
            pcm = np.frombuffer(chunk.pcm, dtype="<i2")[expected - chunk.sample_offset :]
            expected += pcm.size
            if pcm.size:
                yield pcm

    def cancel(self) -> None:
        self._task.cancel()


class Pipeline:
    def __init__(self, router: Router, lookahead: int = 1) -> None:
        self._router = router
        self._lookahead = lookahead

    @property
    def router(self) -> Router:
        """The token servers' router, for the calls that are not syntheses (a voice's encoding)."""
        return self._router

    async def run(
        self, feed: TextFeed, spec: GenerationSpec, deadline: float, stats: PipelineStats,
        listener: PlaybackClock | None = None,
    ) -> AsyncIterator[np.ndarray]:
        """Relays the audio of every piece the feed gives, in order, as 24 kHz int16.

        `deadline` is time.monotonic() based. `stats` is filled as pieces complete.
        `listener` is the client's playback clock (advanced by the caller as audio
        leaves); each piece's generation is told when its audio will be needed.
        Closing the generator early (client gone) cancels every generation in flight.
        """
        listener = listener or PlaybackClock(orpheus.SAMPLE_RATE)
        ready: asyncio.Queue = asyncio.Queue()  # pieces in order, then _END or an error
        room = asyncio.Semaphore(self._lookahead + 1)
        launched: list[_Piece] = []
        relayed = [0]  # samples relayed so far, read by the launcher
        launcher = asyncio.create_task(self._launch(feed, spec, deadline, ready, room, launched, listener, relayed))
        joins = JoinSmoother()
        try:
            while (piece := await ready.get()) is not _END:
                if isinstance(piece, BaseException):
                    raise piece
                joins.start_piece()
                async for pcm in piece.audio():
                    out = joins.feed(pcm)
                    if out.size:
                        relayed[0] += out.size
                        yield out
                tail = joins.end_piece()
                if tail.size:
                    relayed[0] += tail.size
                    yield tail
                if piece.summary is None:
                    log.warning("token server ended piece %d of %s without a summary", piece.index, spec.request_id)
                stats.add(piece)
                room.release()
        finally:
            launcher.cancel()
            for piece in launched:
                piece.cancel()

    async def _launch(
        self,
        feed: TextFeed,
        spec: GenerationSpec,
        deadline: float,
        ready: asyncio.Queue,
        room: asyncio.Semaphore,
        launched: list[_Piece],
        listener: PlaybackClock,
        relayed: list[int],
    ) -> None:
        previous: _Piece | None = None
        try:
            while True:
                await room.acquire()
                if previous is not None:
                    await previous.started.wait()
                text = await feed.next_piece(first=previous is None, deadline=deadline)
                if text is None:
                    ready.put_nowait(_END)
                    return
                index = len(launched)
                request = _piece_request(spec, index, text, listener, relayed[0])
                previous = _Piece(self._router, request, index, deadline, spec.family)
                launched.append(previous)
                ready.put_nowait(previous)
        except asyncio.CancelledError:
            raise
        except BaseException as err:  # the feed failed: the relay loop raises it in order
            ready.put_nowait(err)
