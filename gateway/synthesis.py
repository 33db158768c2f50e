"""One synthesis as the client sees it: pieces of audio in its encoding, then a summary.

Every door's calls end here: the pipeline's PCM goes through the client's encoder,
and the summary is measured at the gateway (arrival to first audio sent, wall time
over audio delivered), because that is the latency the client lives with.

Each call keeps its listener's playback clock (chorus.realtime.playback): playback starts the
start buffer after the first audio sent, and every piece of audio sent after its
time counts as an underrun, with the seconds the listener waited, in the metrics and
the summary. The pipeline passes the same schedule to the token servers.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator

from chorus.realtime.playback import PlaybackClock
from chorus.telemetry import tracing
from gateway import metrics
from chorus.proto.tts.v1 import common_pb2
from gateway.encoding import Encoded, OffloadedEncoder, StreamEncoder
from gateway.errors import invalid
from gateway.feed import TextFeed
from gateway.pipeline import Pipeline, PipelineStats
from gateway.request_types import SynthesisOptions


async def synthesize(
    pipeline: Pipeline, feed: TextFeed, options: SynthesisOptions, arrived: float
) -> AsyncIterator[Encoded | common_pb2.SynthesisSummary]:
    """Encoded audio as it is ready, then the summary. `arrived` is time.monotonic()
    when the call reached the gateway."""
    deadline = arrived + options.timeout_s
    stats = PipelineStats()
    encoder = OffloadedEncoder(StreamEncoder(options.format, options.sample_rate, options.tempo))
    listener = PlaybackClock(options.sample_rate, options.start_buffer_s)
    first_audio_at = None
    pending_samples = 0  # encoded but not yet released by the muxer
    metrics.IN_FLIGHT_STREAMS.inc()
    try:
        async with contextlib.aclosing(pipeline.run(feed, options.spec, deadline, stats, listener)) as pcm_stream:
            async for pcm in pcm_stream:
                piece = await encoder.encode(pcm)
                pending_samples += piece.num_samples
                if piece.data:
                    first_audio_at = first_audio_at or time.monotonic()
                    yield _sent(listener, Encoded(piece.data, pending_samples))
                    pending_samples = 0
        if stats.pieces == 0:
            raise invalid("the input ended without any text to speak: send text before ending the stream")
        last = await encoder.finish()
        if last.data:
            first_audio_at = first_audio_at or time.monotonic()
            yield _sent(listener, Encoded(last.data, pending_samples + last.num_samples))
    finally:
        encoder.close()
        metrics.IN_FLIGHT_STREAMS.dec()
    yield _summary(options, stats, arrived, first_audio_at, encoder.samples_out, listener)


def _sent(listener: PlaybackClock, piece: Encoded) -> Encoded:
    """Counts the piece against the listener's clock as it leaves (an underrun if late)."""
    stall = listener.deliver(piece.num_samples, time.monotonic())
    if stall is not None:
        metrics.UNDERRUNS.inc()
        metrics.STALL_SECONDS.inc(stall.seconds)
    return piece


def _summary(
    options: SynthesisOptions, stats: PipelineStats, arrived: float, first_audio_at: float | None, samples: int,
    listener: PlaybackClock,
) -> common_pb2.SynthesisSummary:
    audio_seconds = samples / options.sample_rate
    wall = time.monotonic() - arrived
    if first_audio_at is not None:
        metrics.TTFA.observe(first_audio_at - arrived)
    if audio_seconds:
        metrics.REAL_TIME_FACTOR.observe(wall / audio_seconds)
    return common_pb2.SynthesisSummary(
        request_id=options.spec.request_id,
        trace_id=tracing.current_trace_id(),
        tokens=stats.tokens,
        frames=stats.frames,
        audio_seconds=audio_seconds,
        time_to_first_token_ms=_ms_since(arrived, stats.first_token_at),
        time_to_first_audio_ms=_ms_since(arrived, first_audio_at),
        time_to_decodable_frames_ms=_ms_since(arrived, stats.decodable_at),
        real_time_factor=wall / audio_seconds if audio_seconds else 0.0,
        queue_wait_ms=stats.queue_wait_ms,
        prompt_tokens=stats.prompt_tokens,
        finish_reason=stats.finish_reason,
        seed=options.spec.sampling.seed if options.spec.sampling is not None else 0,
        underruns=listener.underruns,
        stall_seconds=listener.stall_seconds,
    )


def _ms_since(start: float, at: float | None) -> float:
    return max(0.0, (at - start) * 1000) if at is not None else 0.0
