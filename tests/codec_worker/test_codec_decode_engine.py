"""The codec worker's decode engine on the demo SNAC weights: cross-stream batching,
freeing cancelled streams, and serving the most urgent streams first."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import torch

from chorus.realtime.capacity import RealTimeCapacity
from chorus.realtime.playback import PlaybackClock
from chorus.speech import orpheus
from chorus.speech.orpheus import CODEBOOK_SIZE, CODES_PER_FRAME
from services.codec_worker.decode_engine import (
    AMPLE_LEAD_S,
    THRIFT_LEAD_S,
    URGENT_LEAD_S,
    Audio,
    DecodeEngine,
    End,
    defer_short_passes,
    plan_step,
    to_pcm16,
)
from services.codec_worker.model import load_snac
from services.codec_worker.streaming_decoder import StreamingSnacDecoder


@pytest.fixture(scope="module")
def decoder(snac_dir):
    torch.manual_seed(0)
    return StreamingSnacDecoder(load_snac(snac_dir, device="cpu").model)


def random_frames(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, CODEBOOK_SIZE, (n, CODES_PER_FRAME))


def alone(decoder, frames: np.ndarray) -> bytes:
    state = decoder.new_stream(deterministic=True)
    chunks = [decoder.decode([(state, frames[i : i + 1])])[0] for i in range(len(frames))]
    chunks.append(decoder.flush(state))
    return b"".join(to_pcm16(c.samples) for c in chunks if c is not None)


async def collect(stream) -> tuple[list[Audio], bool]:
    chunks = []
    while True:
        item = await stream.get()
        if isinstance(item, End):
            return chunks, True
        assert isinstance(item, Audio), item
        chunks.append(item)


def test_engine_batches_concurrent_streams_and_frees_cancelled(decoder):
    streams = [random_frames(seed, 8) for seed in (20, 21, 22, 23)]
    expected = [alone(decoder, f) for f in streams]

    async def run():
        # A long wait: every step waits for all four streams, so sharing is certain.
        engine = DecodeEngine(decoder, max_batch=4, batch_wait_ms=2000.0)
        engine.start()
        try:
            handles = [engine.open_stream(deterministic=True) for _ in streams]
            doomed = engine.open_stream(deterministic=True)
            doomed.submit(streams[0][:2])
            for step in range(8):
                for handle, frames in zip(handles, streams):
                    handle.submit(frames[step : step + 1])
                await asyncio.sleep(0)
            for handle in handles:
                handle.finish()
            results = await asyncio.gather(*(collect(h) for h in handles))
            doomed.cancel()
            for _ in range(100):
                if engine.open_streams == 0:
                    break
                await asyncio.sleep(0.02)
            return results, engine.open_streams, engine.stats
        finally:
            await engine.aclose()

    results, left_open, stats = asyncio.run(run())
    for (chunks, ended), pcm in zip(results, expected):
        assert ended
        assert chunks[0].sample_offset == 0
        got = b"".join(c.pcm for c in chunks)
        assert got == pcm  # bit-exact however batched (tests/codec_worker/test_codec_determinism.py)
    assert left_open == 0
    # With a wait, streams that submit together share forwards.
    assert stats.forwards < stats.streams_stepped


class _Stream:
    """What plan_step reads of a stream: pending frames and a lead."""

    def __init__(self, name: str, lead: float | None, pending: int = 1, finishing: bool = False) -> None:
        self.name, self._lead, self.pending, self.finishing = name, lead, [object()] * pending, finishing

    def pending_frames(self) -> int:
        return len(self.pending)

    def lead(self, now: float) -> float | None:
        return self._lead


def test_a_step_serves_streams_without_audio_first_then_the_least_ahead():
    streams = [_Stream("comfortable", AMPLE_LEAD_S + 3), _Stream("new", None), _Stream("late", -0.4),
               _Stream("close", URGENT_LEAD_S / 2), _Stream("ahead", (URGENT_LEAD_S + AMPLE_LEAD_S) / 2)]
    urgent, rest = plan_step(streams, now=0.0, max_batch=8)
    assert [s.name for s in urgent] == ["new", "late", "close"]
    assert [s.name for s in rest] == ["ahead"]  # "comfortable" has ample lead: it sits out
    urgent, rest = plan_step(streams, now=0.0, max_batch=2)  # a batch is formed from the most urgent
    assert [s.name for s in urgent] == ["new", "late"] and rest == []


def test_with_nobody_urgent_every_stream_is_decoded_least_ahead_first():
    streams = [_Stream("comfortable", AMPLE_LEAD_S + 3), _Stream("ahead", AMPLE_LEAD_S - 0.1)]
    urgent, rest = plan_step(streams, now=0.0, max_batch=8)
    assert urgent == [] and [s.name for s in rest] == ["ahead", "comfortable"]


def test_one_streams_backlog_does_not_delay_another_streams_first_audio(decoder):
    """A stream with a backlog, far ahead of its listener, and a new stream with just
    its first frames, in the same step: the new stream's audio is handed over first."""
    backlog, fresh = random_frames(30, 4), random_frames(31, 3)
    order: list[str] = []

    async def read(name: str, stream) -> list[Audio]:
        chunks = []
        while not isinstance(item := await stream.get(), End):
            assert isinstance(item, Audio), item
            order.append(name)
            chunks.append(item)
        return chunks

    async def run():
        engine = DecodeEngine(decoder, max_batch=4, batch_wait_ms=0.0, max_frames_per_step=4)
        # Opened and fed before the thread starts, so both are in its first step.
        ahead_clock = PlaybackClock.scheduled(orpheus.SAMPLE_RATE, asyncio.get_running_loop().time() + 1e6)
        ahead = engine.open_stream(deterministic=True, clock=ahead_clock)
        new = engine.open_stream(deterministic=True)
        ahead.submit(backlog)
        new.submit(fresh)
        ahead.finish()
        new.finish()
        engine.start()
        try:
            return await asyncio.gather(read("ahead", ahead), read("new", new))
        finally:
            await engine.aclose()

    ahead_chunks, new_chunks = asyncio.run(run())
    assert order[0] == "new"
    assert new_chunks and ahead_chunks
    got = np.frombuffer(b"".join(c.pcm for c in new_chunks), "<i2").astype(int)
    want = np.frombuffer(alone(decoder, fresh), "<i2").astype(int)
    assert len(got) == len(want) == len(fresh) * orpheus.SAMPLES_PER_FRAME
    assert np.abs(got - want).max() <= 1  # float rounding of a 3-frame step vs three 1-frame steps


def test_capacity_lost_to_a_bad_calibration_comes_back_while_no_stream_is_open(decoder):
    """Issue 22 on the codec side: every size measured slow at start (fake step times),
    so capacity 1; with no stream to decode, only the idle probes can bring it back."""
    capacity = RealTimeCapacity(orpheus.FRAME_SECONDS, 8)
    for size in range(1, 9):
        capacity.remeasure(size, 1.0 * size)
    assert capacity.estimated_streams() == 1
    engine = DecodeEngine(decoder, max_batch=4, capacity=capacity, probe_interval_s=0.05)
    engine.start()
    try:
        for _ in range(600):  # bounded: a capacity frozen for good fails below
            if capacity.estimated_streams() > 1:
                break
            time.sleep(0.05)
        assert capacity.estimated_streams() > 1, f"still 1 after {engine.probe.probes} probes"
        assert engine.open_streams == 0
    finally:
        engine.stop()


def test_a_stream_well_ahead_waits_for_a_full_pass_unless_finishing():
    streams = [_Stream("ahead, one frame", THRIFT_LEAD_S + 0.5), _Stream("ahead, full pass", THRIFT_LEAD_S + 2, pending=4),
               _Stream("ahead, finishing", THRIFT_LEAD_S + 3, finishing=True), _Stream("close", THRIFT_LEAD_S - 0.01),
               _Stream("new", None)]
    now_ready, wait_s = defer_short_passes(streams, now=0.0, full_pass=4)
    assert [s.name for s in now_ready] == ["ahead, full pass", "ahead, finishing", "close", "new"]
    # The deferred stream is looked at again before its lead falls under the threshold.
    assert wait_s == pytest.approx(0.5)
    assert defer_short_passes(streams[1:], now=0.0, full_pass=4)[1] is None


def test_a_stream_well_ahead_is_decoded_a_full_pass_at_a_time_with_the_same_audio(decoder):
    """A stream far ahead of its listener sends one frame, then three: nothing is decoded
    until the fourth is pending, then one step decodes all four, to the same audio as
    frame by frame."""
    frames = random_frames(40, 4)

    async def run():
        engine = DecodeEngine(decoder, max_batch=4, max_frames_per_step=4)
        engine.start()
        try:
            clock = PlaybackClock.scheduled(orpheus.SAMPLE_RATE, asyncio.get_running_loop().time() + 1e6)
            stream = engine.open_stream(deterministic=True, clock=clock)
            stream.submit(frames[:1])
            for _ in range(10):  # the engine thread gets every chance to (wrongly) decode it
                await asyncio.sleep(0.02)
            decoded_early = engine.stats.frames
            stream.submit(frames[1:])
            first = await stream.get()
            steps_for_four = engine.stats.steps
            stream.finish()
            rest, ended = await collect(stream)
            return decoded_early, steps_for_four, [first, *rest], ended
        finally:
            await engine.aclose()

    decoded_early, steps_for_four, chunks, ended = asyncio.run(run())
    assert decoded_early == 0
    assert steps_for_four == 1
    assert ended and b"".join(c.pcm for c in chunks) == alone(decoder, frames)


def test_a_deferred_stream_is_decoded_once_its_lead_falls_to_the_threshold(decoder):
    """No more frames come (a paused or slow token server): the pending frame is decoded
    when the listener's lead reaches THRIFT_LEAD_S, without a finish or another frame."""
    frames = random_frames(41, 1)

    async def run():
        engine = DecodeEngine(decoder, max_batch=4, max_frames_per_step=4)
        engine.start()
        try:
            loop = asyncio.get_running_loop()
            clock = PlaybackClock.scheduled(orpheus.SAMPLE_RATE, loop.time() + THRIFT_LEAD_S + 0.2)
            stream = engine.open_stream(deterministic=True, clock=clock)
            stream.submit(frames)
            for _ in range(1500):  # up to 30 s; the lead reaches the threshold after 0.2 s
                if engine.stats.frames:
                    break
                await asyncio.sleep(0.02)
            return engine.stats.frames, clock.lead(loop.time())
        finally:
            await engine.aclose()

    decoded, lead_after = asyncio.run(run())
    assert decoded == 1
    assert lead_after <= THRIFT_LEAD_S  # it waited for the threshold, not for more frames
