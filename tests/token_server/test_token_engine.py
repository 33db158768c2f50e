"""The continuous-batching engine on the real demo GGUF in llama.cpp."""

from __future__ import annotations

import asyncio
import time

import pytest

from chorus.realtime.capacity import RECOUNT_EVERY, RealTimeCapacity
from chorus.realtime.playback import PlaybackClock
from chorus.speech import orpheus
from services.token_server import engine as engine_module
from services.token_server.engine import Engine, TOKEN_SECONDS
from services.token_server.request import (
    Finished,
    Frame,
    GenerationFailed,
    GenerationRequest,
    PromptTooLongError,
    QueueFullError,
)
from services.token_server.llama_backend import LlamaBackbone
from services.token_server.sampler import SamplingParams

pytestmark = pytest.mark.slow  # over 15 s: started first (tests/conftest.py)

SLOTS = 4
CTX_PER_SLOT = 1024


@pytest.fixture(scope="module")
def backbone(gguf_path):
    bb = LlamaBackbone(gguf_path, n_ctx=SLOTS * CTX_PER_SLOT, n_batch=64, n_seq_max=SLOTS, threads=2)
    yield bb
    bb.close()


@pytest.fixture
def engine(backbone):
    # A small n_batch forces chunked prefill to share steps with generation.
    # Admission by slots only: these tests are about batching, not about this machine's speed.
    eng = Engine(backbone, slots=SLOTS, n_batch=64, queue_size=2, ctx_per_slot=CTX_PER_SLOT,
                 capacity=RealTimeCapacity(TOKEN_SECONDS, SLOTS, enforce=False))
    eng.start()
    yield eng
    eng.stop()


def make_request(backbone, rid: str, text: str, sampling: SamplingParams, frames: int) -> GenerationRequest:
    prompt = orpheus.wrap_prompt(backbone.tokenize(orpheus.prompt_text(text, "tara")))
    return GenerationRequest(rid, prompt, sampling, token_budget=frames * orpheus.CODES_PER_FRAME)


async def run_one(engine, req):
    return await collect(engine.submit(req))


async def collect(handle):
    frames, last = [], None
    async for event in handle.events():
        if isinstance(event, Frame):
            frames.append(event)
        else:
            last = event
    return frames, last


TEXTS = [
    "Hi.",
    "The quick brown fox jumps over the lazy dog, twice, before breakfast.",
    "Streaming speech should start before the sentence is over.",
    "A much longer prompt: " + "every word of this sentence adds a few bytes to the prompt. " * 4,
    "Short one again!",
]


@pytest.mark.parametrize(
    "sampling",
    [SamplingParams(temperature=0.0, repetition_penalty=1.0), SamplingParams(seed=1234)],
    ids=["greedy", "seeded"],
)
def test_batched_output_matches_each_request_alone(backbone, engine, sampling):
    requests = [
        make_request(backbone, f"r{i}", text, SamplingParams(**{**sampling.__dict__, "seed": sampling.seed + i}), 6)
        for i, text in enumerate(TEXTS)
    ]

    async def run_alone():
        out = []
        for req in requests:
            frames, last = await collect(engine.submit(req))
            assert isinstance(last, Finished)
            out.append([f.codes for f in frames])
        return out

    async def run_batched():
        tasks = []
        for i, req in enumerate(requests):
            tasks.append(asyncio.create_task(collect(engine.submit(req))))
            # Arrivals at different steps: later requests join a running batch.
            await asyncio.sleep(0.02 * i)
        results = await asyncio.gather(*tasks)
        batched_stats[:] = [last for _, last in results]
        return [[f.codes for f in frames] for frames, _ in results]

    batched_stats = []
    alone = asyncio.run(run_alone())
    batched = asyncio.run(run_batched())
    assert all(len(frames) == 6 for frames in alone)
    assert batched == alone
    # The batched run really shared steps: some requests were in slots at once.
    spans = sorted((last.stats.admitted_at, last.stats.finished_at) for last in batched_stats)
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:]))
    # The requests really differ from each other (the comparison is not vacuous).
    assert len({tuple(map(tuple, f)) for f in alone}) == len(alone)


def test_frames_hold_legal_codes_and_indices(backbone, engine):
    req = make_request(backbone, "legal", "Check every code.", SamplingParams(seed=7, temperature=1.5, top_p=1.0), 8)

    frames, last = asyncio.run(run_one(engine, req))
    assert [f.index for f in frames] == list(range(len(frames)))
    assert isinstance(last, Finished) and last.stats.frames == len(frames)
    for frame in frames:
        assert len(frame.codes) == orpheus.CODES_PER_FRAME
        assert all(0 <= c < orpheus.CODEBOOK_SIZE for c in frame.codes)
    assert last.stats.generated_tokens == len(frames) * orpheus.CODES_PER_FRAME


def test_cancelled_request_frees_slot_and_kv_while_others_finish(backbone, engine):
    long_req = make_request(backbone, "doomed", "This one is cancelled mid-stream.", SamplingParams(seed=1), 120)
    others = [make_request(backbone, f"ok{i}", TEXTS[i], SamplingParams(seed=i), 5) for i in range(2)]
    expected = [asyncio.run(run_one(engine, r))[0] for r in others]

    async def scenario():
        doomed = engine.submit(long_req)
        tasks = [asyncio.create_task(collect(engine.submit(r))) for r in others]
        seen = 0
        async for event in doomed.events():
            assert isinstance(event, Frame)
            seen += 1
            if seen == 2:
                break
        seq = engine.run_in_engine(lambda e: next(i for i, a in enumerate(e.scheduler.slots) if a and a.owner is doomed))
        seq = await asyncio.wrap_future(seq)
        assert backbone_len(seq) > 0
        doomed.cancel()
        # The next engine-thread call runs after the cancel was handled, before any further step.
        state = await asyncio.wrap_future(engine.run_in_engine(lambda e: (e.scheduler.slots[seq], e.backbone.sequence_length(seq))))
        results = await asyncio.gather(*tasks)
        return seq, state, results

    def backbone_len(seq):
        return engine.run_in_engine(lambda e: e.backbone.sequence_length(seq)).result()

    seq, (slot_after, kv_after), results = asyncio.run(scenario())
    # Nothing was waiting, so the slot stays empty: freed, with no KV left.
    assert slot_after is None
    assert kv_after == 0
    for (frames, last), want in zip(results, expected):
        assert isinstance(last, Finished)
        assert [f.codes for f in frames] == [f.codes for f in want]
    assert engine.load() == (0, 0)
    assert all(backbone_len(s) == 0 for s in range(SLOTS))


def test_full_queue_rejects_and_admitted_requests_complete(backbone, engine):
    capacity = SLOTS + engine.queue_size
    reqs = [make_request(backbone, f"q{i}", "Fill the queue.", SamplingParams(seed=i), 4) for i in range(capacity)]

    async def scenario():
        handles = [engine.submit(r) for r in reqs]
        with pytest.raises(QueueFullError, match="all are taken"):
            engine.submit(make_request(backbone, "over", "One too many.", SamplingParams(), 4))
        return await asyncio.gather(*(collect(h) for h in handles))

    results = asyncio.run(scenario())
    assert all(isinstance(last, Finished) and len(frames) == 4 for frames, last in results)
    waits = [last.stats.queue_wait_s for _, last in results]
    assert max(waits) > 0  # some requests really waited in the queue
    assert engine.load() == (0, 0)


def test_prompt_longer_than_slot_context_is_refused(backbone, engine):
    req = make_request(backbone, "huge", "x" * 2000, SamplingParams(), 4)
    with pytest.raises(PromptTooLongError, match="slot's context"):
        asyncio.run(run_one(engine, req))


def test_end_of_speech_only_at_frame_boundary(backbone, engine):
    # A high temperature makes end of speech likely early if it were allowed anywhere;
    # the engine must still deliver only whole frames.
    for seed in range(3):
        req = make_request(backbone, f"eos{seed}", "Stop?", SamplingParams(seed=seed, temperature=2.0, top_p=1.0), 30)
        frames, last = asyncio.run(run_one(engine, req))
        assert isinstance(last, Finished) and not isinstance(last, GenerationFailed)
        assert last.stats.generated_tokens == len(frames) * orpheus.CODES_PER_FRAME
        assert len(frames) >= 1


def test_paced_and_batched_tokens_are_those_of_each_request_alone(backbone):
    """A stream far ahead of its listener sits steps out while another needs them; its
    tokens, and the other's, are still exactly those of each request run alone."""
    now = [1000.0]
    engine = Engine(backbone, slots=SLOTS, n_batch=64, queue_size=2, ctx_per_slot=CTX_PER_SLOT,
                    capacity=RealTimeCapacity(TOKEN_SECONDS, SLOTS, enforce=False), pace_lead_s=0.2,
                    clock=lambda: now[0])
    engine.start()
    try:
        def request(rid: str, text: str, due_in_s: float) -> GenerationRequest:
            req = make_request(backbone, rid, text, SamplingParams(seed=hash(rid) % 1000), 12)
            # Playing from `due_in_s` from the (frozen) engine clock: "ahead" is 0.2 s of
            # lead after 2 frames and then paced; "behind" was due long ago and never is.
            req.playback = PlaybackClock.scheduled(orpheus.SAMPLE_RATE, now[0] + due_in_s)
            return req

        def pair():
            return [request("ahead", "I am far ahead of my listener.", 0.0),
                    request("behind", "My listener is waiting for me.", -100.0)]

        alone = [asyncio.run(run_one(engine, req)) for req in pair()]

        async def together():
            return await asyncio.gather(*(collect(engine.submit(req)) for req in pair()))

        paced = asyncio.run(together())
    finally:
        engine.stop()
    (ahead_alone, _), (behind_alone, _) = alone
    (ahead_frames, ahead_last), (behind_frames, behind_last) = paced
    assert [f.codes for f in ahead_frames] == [f.codes for f in ahead_alone]
    assert [f.codes for f in behind_frames] == [f.codes for f in behind_alone]
    assert len(ahead_frames) == len(behind_frames) == 12
    assert ahead_last.stats.paced_steps > 0  # it really sat steps out...
    assert behind_last.stats.paced_steps == 0
    assert alone[0][1].stats.paced_steps == 0  # ...and alone, nobody needed its steps


# -- issue 22: a busy start must not freeze capacity; the queue bound holds ------------
# Fake step times force the bad calibration; nothing here asserts how long anything took.


class BusyClock:
    """`time` for the engine module whose perf_counter runs `extra` seconds fast on every
    read: each measured step then looks `extra` seconds slower, as in a busy start."""

    def __init__(self, extra: float) -> None:
        self.extra = extra
        self.reads = 0

    def perf_counter(self) -> float:
        self.reads += 1
        return time.perf_counter() + self.extra * self.reads

    def __getattr__(self, name):
        return getattr(time, name)


def wait_until(condition, attempts: int = 600, pause_s: float = 0.05) -> bool:
    for _ in range(attempts):
        if condition():
            return True
        time.sleep(pause_s)
    return condition()


def test_a_bad_calibration_recovers_by_probing_while_idle(backbone, monkeypatch):
    capacity = RealTimeCapacity(TOKEN_SECONDS, SLOTS)
    engine = Engine(backbone, slots=SLOTS, n_batch=64, queue_size=2, ctx_per_slot=CTX_PER_SLOT,
                    capacity=capacity, probe_interval_s=0.05)
    engine.start()
    try:
        monkeypatch.setattr(engine_module, "time", BusyClock(0.5))
        measured = engine.run_in_engine(lambda e: e.calibrate()).result()
        monkeypatch.undo()
        assert min(measured.values()) >= 0.5  # every size measured "busy": the forced bad start
        assert capacity.estimated_streams() == 1
        # No request arrives: only the idle probes can show the machine is free again.
        assert wait_until(lambda: capacity.estimated_streams() > 1), (
            f"capacity stayed {capacity.estimated_streams()} after {engine.probe.probes} probes")
        assert engine.probe.probes >= 1
        assert engine.load() == (0, 0)
        kv = engine.run_in_engine(lambda e: [e.backbone.sequence_length(s) for s in range(SLOTS)]).result()
        assert kv == [0] * SLOTS  # a probe leaves no KV behind in the slots it borrowed
    finally:
        engine.stop()


def test_no_probe_while_capacity_is_at_its_limit(backbone):
    capacity = RealTimeCapacity(TOKEN_SECONDS, SLOTS, smoothing=1.0)
    for size in range(1, SLOTS + 1):
        capacity.remeasure(size, TOKEN_SECONDS * size / (4 * SLOTS))  # every slot fits
    engine = Engine(backbone, slots=SLOTS, n_batch=64, queue_size=2, ctx_per_slot=CTX_PER_SLOT,
                    capacity=capacity, probe_interval_s=0.0)
    assert capacity.estimated_streams() == SLOTS
    assert not engine._probe_due()
    for _ in range(RECOUNT_EVERY):
        capacity.record(1, 1.0)  # live one-stream steps: the machine got busy
    assert capacity.estimated_streams() == 1 and engine._probe_due()


def test_the_queue_bound_holds_when_the_codec_share_holds_admission_back(backbone):
    """GetStatus reported 34 waiting against a queue of 32: the bound counted every stream
    real-time capacity allows as 'about to run', though the codec share let one start."""
    engine = Engine(backbone, slots=SLOTS, n_batch=64, queue_size=2, ctx_per_slot=CTX_PER_SLOT,
                    capacity=RealTimeCapacity(TOKEN_SECONDS, SLOTS, enforce=False),
                    codec_streams_limit=lambda: 1, probe_interval_s=None)
    loop = asyncio.new_event_loop()
    try:
        accepted = []
        with pytest.raises(QueueFullError):
            for i in range(SLOTS + 3):
                accepted.append(engine.submit(make_request(backbone, f"r{i}", "Wait your turn.", SamplingParams(), 7), loop))
        assert len(accepted) == 1 + engine.queue_size
        busy, waiting = engine.load()
        assert waiting <= engine.queue_size
    finally:
        engine.stop()
        loop.close()
