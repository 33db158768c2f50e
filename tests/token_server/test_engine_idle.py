"""The token engine's thread with nothing it can do: it waits, it does not spin.

The unit under test is the engine thread and the scheduler loop; llama.cpp and the codec
pool are fakes, so a step costs only the engine's own Python. CPU time is the engine
thread's own (`time.thread_time` read on that thread), a bound on work done rather than
on how long anything took, so a loaded machine only makes it easier to meet."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from chorus.realtime.capacity import RealTimeCapacity
from chorus.realtime.playback import PlaybackClock
from chorus.speech import orpheus
from services.token_server.engine import Engine, IDLE_POLL_S, TOKEN_SECONDS
from services.token_server.request import Finished, Frame, GenerationRequest
from services.token_server.sampler import SamplingParams
from services.token_server.scheduler import StepPlan
from test_token_scheduler import NOW, ahead_by, place, sequence

pytestmark = pytest.mark.serial  # judges real time: runs alone (pyproject.toml's markers)

SLOTS = 4
VOCAB = orpheus.AUDIO_TOKEN_BASE + orpheus.CODES_PER_FRAME * orpheus.CODEBOOK_SIZE
MEASURE_S = 2.0
MAX_CPU_SHARE = 0.05


class FakeBackbone:
    """llama.cpp's place in the engine: every decode succeeds at once, and end of speech
    never wins, so a stream runs to its token budget."""

    def __init__(self) -> None:
        self.row = np.zeros(VOCAB, dtype=np.float32)
        self.row[orpheus.END_OF_SPEECH] = -1e9

    def clear_sequence(self, slot: int) -> None:
        pass

    def decode(self, batch) -> None:
        pass

    def logits_at(self, index: int) -> np.ndarray:
        return self.row


class FakeCodecPool:
    """Codec room as the relay reports it: a stream opens at its request's first frame
    and stays open (its audio still playing out) until the test releases it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.handles: list = []
        self.released: set = set()

    def streams_limit(self) -> int:
        return self.limit

    def open_streams(self) -> int:
        return sum(1 for h in self.handles if h.stats.first_frame_at is not None and h not in self.released)


def fake_engine(pool: FakeCodecPool, **options) -> Engine:
    """Admission by slots and codec room only (capacity not enforced, no probes): the
    fakes' step times say nothing about this machine."""
    return Engine(FakeBackbone(), slots=SLOTS, n_batch=64, queue_size=4, ctx_per_slot=1024,
                  capacity=RealTimeCapacity(TOKEN_SECONDS, SLOTS, enforce=False), pace_lead_s=2.0,
                  codec_streams_limit=pool.streams_limit, codec_streams_open=pool.open_streams,
                  probe_interval_s=None, **options)


def request(rid: str, frames: int, due_in_s: float | None) -> GenerationRequest:
    prompt = orpheus.wrap_prompt([orpheus.BOS] + [1] * 8)
    playback = None if due_in_s is None else PlaybackClock.scheduled(orpheus.SAMPLE_RATE, time.monotonic() + due_in_s)
    return GenerationRequest(rid, prompt, SamplingParams(seed=1), token_budget=frames * orpheus.CODES_PER_FRAME,
                             playback=playback)


async def collect(handle) -> tuple[int, object]:
    frames, last = 0, None
    async for event in handle.events():
        if isinstance(event, Frame):
            frames += 1
        else:
            last = event
    return frames, last


async def engine_cpu_seconds(engine: Engine) -> float:
    return await asyncio.wrap_future(engine.run_in_engine(lambda e: time.thread_time()))


async def wait_until(condition, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return condition()


def test_a_full_codec_pool_with_streams_ahead_costs_the_engine_thread_almost_nothing():
    """Two streams far ahead of their listeners hold the codec pool's two seats, a third
    request waits for a seat. The old loop paced both streams for the waiting request
    that codec room kept out, planned an empty step and ran the next one at once, a core
    spent on nothing; now the waiting request needs no step, the two run out their
    budget, and the engine waits for codec room with its thread all but idle."""
    pool = FakeCodecPool(limit=2)
    engine = fake_engine(pool)

    async def scenario():
        loop = asyncio.get_running_loop()
        # Posted before the thread starts, so that the first step sees all three and the
        # third waits while the first two are still running (and, before, were paced).
        ahead = [engine.submit(request(f"ahead{i}", frames=3, due_in_s=100.0), loop) for i in range(2)]
        waiting = engine.submit(request("waiting", frames=2, due_in_s=None), loop)
        pool.handles.extend([*ahead, waiting])
        engine.start()
        started_cpu = await engine_cpu_seconds(engine)
        await asyncio.sleep(MEASURE_S)
        spent = await engine_cpu_seconds(engine) - started_cpu
        assert engine.scheduler.has_waiting(), "the third request should have waited for codec room"
        assert spent < MAX_CPU_SHARE * MEASURE_S, (
            f"the engine thread used {spent:.3f} s of CPU in {MEASURE_S} s with nothing it could do")
        # Codec room frees: the waiting request is admitted without any other nudge.
        pool.released.update(ahead)
        results = await asyncio.wait_for(asyncio.gather(*(collect(h) for h in (*ahead, waiting))), 30)
        return results

    try:
        results = asyncio.run(scenario())
    finally:
        engine.stop()
    frames = [n for n, _ in results]
    assert frames == [3, 3, 2]
    assert all(isinstance(last, Finished) for _, last in results)
    assert results[2][1].stats.admitted_at > max(last.stats.finished_at for _, last in results[:2])


def test_a_request_waiting_for_codec_room_is_admitted_once_room_frees():
    """Nothing posts a command when the codec pool reports room: the engine's own wait
    ends often enough to see it."""
    pool = FakeCodecPool(limit=1)
    engine = fake_engine(pool)

    async def scenario():
        loop = asyncio.get_running_loop()
        engine.start()
        first = engine.submit(request("first", frames=2, due_in_s=None), loop)
        pool.handles.append(first)
        first_result = await asyncio.wait_for(collect(first), 30)
        second = engine.submit(request("second", frames=2, due_in_s=None), loop)
        pool.handles.append(second)
        still_waiting = await wait_until(lambda: engine.scheduler.has_waiting(), 5)
        pool.released.add(first)
        return first_result, still_waiting, await asyncio.wait_for(collect(second), 30)

    try:
        first_result, still_waiting, second_result = asyncio.run(scenario())
    finally:
        engine.stop()
    assert isinstance(first_result[1], Finished)
    assert still_waiting
    frames, last = second_result
    assert isinstance(last, Finished) and frames == 2


def test_an_empty_plan_with_streams_in_slots_waits_until_a_paced_stream_needs_the_step():
    """The wait the engine asks of its thread after a step it could not run: never past
    the moment the least-ahead paced stream needs the step again, never past the codec
    poll, and none with no slot busy (the thread's own idle wait covers that)."""
    engine = fake_engine(FakeCodecPool(limit=SLOTS), clock=lambda: NOW)
    assert engine._idle_wait(StepPlan(), NOW) is None
    almost = sequence("almost", clock=ahead_by(2.005), generating=True)
    far = sequence("far", clock=ahead_by(30.0), generating=True)
    place(engine.scheduler, almost, far)
    assert engine._idle_wait(StepPlan(paced=[far, almost]), NOW) == pytest.approx(0.005)
    assert engine._idle_wait(StepPlan(paced=[far]), NOW) == IDLE_POLL_S
    assert engine._idle_wait(StepPlan(), NOW) == IDLE_POLL_S


def test_every_request_is_counted_out_once_whether_it_ends_at_its_budget_or_is_cancelled():
    """A request counts in the engine (against its queue bound) from submit to its end:
    the frames of its last step and its Finished leave it once, a cancel once."""
    pool = FakeCodecPool(limit=SLOTS)
    engine = fake_engine(pool)

    async def scenario():
        loop = asyncio.get_running_loop()
        engine.start()
        ended = [engine.submit(request(f"short{i}", frames=2, due_in_s=None), loop) for i in range(2)]
        doomed = engine.submit(request("doomed", frames=100, due_in_s=None), loop)
        results = await asyncio.wait_for(asyncio.gather(*(collect(h) for h in ended)), 30)
        async for _ in doomed.events():
            break  # its first frame: then cancel it
        doomed.cancel()
        await asyncio.wrap_future(engine.run_in_engine(lambda e: None))  # the cancel is handled
        return results

    try:
        results = asyncio.run(scenario())
    finally:
        engine.stop()
    assert [frames for frames, _ in results] == [2, 2]
    assert (engine._in_system, engine._in_system_codec) == (0, 0)
    assert engine.load() == (0, 0)
