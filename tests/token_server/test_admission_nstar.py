"""Admission holds N* streams, and every one of them plays on time (issue 18, item 3).

N* is the largest C whose ceiling(C), the audio seconds per wall second the machine
makes at batch C (the slower of backbone and decoder, the decoder at its better of 1 or
2 frames a step, as `chorus bench --ceiling` measures it), is at least 1.15 C. Here the
machine is a fake cost model with N* = 3: the backbone's step time is a function of its
batch, the decoder's forward a function of the streams and frames in it. A fake clock
advances by those costs while the real code decides: the token server's `Scheduler`
with its `RealTimeCapacity` (calibrated on the fake step times, then learning from the
steps it runs), and the codec worker's `DecodeEngine` over a fake streaming decoder,
whose capacity (what GetLoad reports) bounds the codec room admission reads. The two
engines run on their own cores, as in `chorus serve`; frames and audio pass between
them at the moment they are made.

Each stream's listener starts playback at its first audio plus the 150 ms start buffer
(chorus.realtime.playback), and every late sample is counted. No assertion here is about how long
anything took on this machine: every time is the fake clock's.
"""

from __future__ import annotations

import asyncio
import heapq
import math
from dataclasses import dataclass, field

import numpy as np
import pytest

from chorus.realtime.capacity import ADMISSION_MARGIN, NSTAR_HEADROOM, RealTimeCapacity, calibrate
from chorus.realtime.playback import PlaybackClock
from chorus.speech import orpheus
from services.codec_worker.decode_engine import (
    AMPLE_LEAD_S, MAX_FRAMES_PER_STEP, MIN_FRAMES_PER_STEP, Audio, DecodeEngine, End, frames_per_stream,
)
from services.codec_worker.streaming_decoder import StreamingSnacDecoder
from services.token_server.engine import Engine, IDLE_POLL_S, TOKEN_SECONDS
from services.token_server.request import GenerationRequest, QueueFullError
from services.token_server.sampler import SamplingParams, SequenceSampler
from services.token_server.scheduler import Scheduler, Sequence
from test_engine_idle import FakeBackbone

# -- the machine: a fake cost model ------------------------------------------------

PROMPT_TOKENS = 30
FRAMES = 60  # chorus bench's request: 60 frames, 5.12 s of audio
SLOTS = 8
MAX_BATCH = 16
CODEC_SIZES = (1, 2, 3, 4, 6, 8, 12, 16)  # the sizes a codec worker calibrates
DECODER_REACH_SAMPLES = 4757  # the streaming decoder's first audio needs 2.32 frames


def backbone_step_s(batch: int) -> float:
    """One token for each of `batch` streams: reading the weights, then a part per stream."""
    return 0.002 + 0.0015 * batch


def prefill_s(tokens: int) -> float:
    return 0.004 + 0.0005 * tokens


def decoder_forward_s(streams: int, frames: int) -> float:
    """One forward of the streaming decoder over `streams` streams of `frames` frames each."""
    return 0.005 + 0.021 * streams * frames


def ceiling(c: int) -> float:
    """Audio seconds per wall second at batch c: the slower of the two halves."""
    backbone = c * TOKEN_SECONDS / backbone_step_s(c)
    decoder = max(c * f * orpheus.FRAME_SECONDS / decoder_forward_s(c, f) for f in (1, 2))
    return min(backbone, decoder)


N_STAR = max(c for c in range(1, SLOTS + 1) if ceiling(c) >= NSTAR_HEADROOM * c)


def token_capacity() -> RealTimeCapacity:
    capacity = RealTimeCapacity(TOKEN_SECONDS, SLOTS)  # the default margin: ADMISSION_MARGIN
    calibrate(capacity, backbone_step_s, range(1, SLOTS + 1))
    return capacity


def codec_capacity() -> RealTimeCapacity:
    """The codec worker's, calibrated as it does at start: one-frame steps."""
    capacity = RealTimeCapacity(orpheus.FRAME_SECONDS, MAX_BATCH, ADMISSION_MARGIN)
    calibrate(capacity, lambda size: decoder_forward_s(size, 1), CODEC_SIZES)
    return capacity


def test_the_fake_machine_holds_three_streams_by_the_definition():
    assert N_STAR == 3
    assert ceiling(3) >= 1.15 * 3 and ceiling(4) < 1.15 * 4


def test_capacity_at_the_admission_margin_is_n_star():
    """The admission margin is the N* definition's headroom, so capacity is the largest
    batch whose ceiling is 1.15 times the batch: neither fewer streams nor more."""
    assert 1.0 + ADMISSION_MARGIN == pytest.approx(NSTAR_HEADROOM)
    assert min(token_capacity().streams(), codec_capacity().streams()) == N_STAR


# -- the codec worker's neighbour: a streaming decoder that costs fake time ----------


@dataclass
class _Device:
    type: str = "fake"


@dataclass
class FakeState:
    frames_in: int = 0
    emitted: int = 0
    flushed: bool = False

    def shape_key(self) -> tuple[int, ...]:
        # A new stream's caches are still filling: it shares forwards only with streams
        # as young as itself.
        return (min(self.frames_in, 3),)


@dataclass(frozen=True)
class FakeChunk:
    sample_offset: int
    samples: np.ndarray


class FakeDecoder:
    """The streaming decoder's contract (audio up to the decoder's reach behind the frames
    fed, the rest at flush) at the fake cost model's price, paid on the fake clock."""

    # SNAC's facts, which the engine reads from its decoder.
    codes_per_frame = StreamingSnacDecoder.codes_per_frame
    codebook_size = StreamingSnacDecoder.codebook_size
    sample_rate = StreamingSnacDecoder.sample_rate
    frame_seconds = StreamingSnacDecoder.frame_seconds
    check_start = staticmethod(StreamingSnacDecoder.check_start)

    def __init__(self, sim) -> None:
        self.sim = sim  # its fake clock (codec_now) and step-time jitter
        self.device = _Device()
        self.last_batch_sizes: list[int] = []

    def new_stream(self, **_) -> FakeState:
        return FakeState()

    def decode(self, items, max_batch: int = 64):
        groups: dict[tuple, list[int]] = {}
        for i, (state, frames) in enumerate(items):
            groups.setdefault((len(frames), state.shape_key()), []).append(i)
        self.last_batch_sizes = []
        for (n, _), members in groups.items():
            for lo in range(0, len(members), max_batch):
                batch = members[lo : lo + max_batch]
                self.last_batch_sizes.append(len(batch))
                self.sim.codec_now += decoder_forward_s(len(batch), n) * self.sim.jitter()
        out = []
        for state, frames in items:
            state.frames_in += len(frames)
            ready = max(0, state.frames_in * orpheus.SAMPLES_PER_FRAME - DECODER_REACH_SAMPLES)
            out.append(self._chunk(state, ready))
        return out

    def flush(self, state: FakeState):
        state.flushed = True
        self.sim.codec_now += decoder_forward_s(1, 1) * self.sim.jitter()
        return self._chunk(state, state.frames_in * orpheus.SAMPLES_PER_FRAME)

    @staticmethod
    def _chunk(state: FakeState, upto: int):
        if upto <= state.emitted:
            return None
        chunk = FakeChunk(state.emitted, np.zeros(upto - state.emitted, dtype=np.float32))
        state.emitted = upto
        return chunk


class _Loop:
    """Where the decode engine hands its events: delivered at once, on the fake clock."""

    def call_soon_threadsafe(self, deliver, items) -> None:
        deliver(items)


# -- the simulation ------------------------------------------------------------------


@dataclass
class Stream:
    name: str
    seq: Sequence
    listener: PlaybackClock  # the client's: first audio plus the start buffer, late samples counted
    codec: object = None  # the decode engine's EngineStream, opened at the first frame
    submitted_at: float = 0.0
    admitted_at: float | None = None
    first_audio_at: float | None = None
    audio_done: bool = False  # its codec stream ended (its seat is free) at audio_done_at
    audio_done_at: float | None = None
    stalls: list = field(default_factory=list)


@dataclass(order=True)
class _Transit:
    at: float
    order: int
    what: object = field(compare=False)


class Simulation:
    """A token engine and a codec worker on their own cores, in fake time."""

    def __init__(self, concurrent: int, requests: int | None = None, pace_lead_s: float | None = 2.0,
                 stagger_s: float = 0.0, jitter: float = 0.0, seed: int = 0) -> None:
        """`concurrent` requests arrive `stagger_s` apart (together at 0); each that ends is
        followed by the next (as `chorus bench` keeps a level's requests in flight) until
        `requests` ran."""
        self.token_now = 0.0
        self.codec_now = 0.0
        self.codec_wake = 0.0  # when a step that deferred its streams looks again
        # Each step costs its model's time times a factor in [1 - jitter, 1 + jitter].
        self._jitter = jitter
        self._rng = np.random.default_rng(seed)
        self.capacity = token_capacity()
        self.decoder = FakeDecoder(self)
        self.codec = DecodeEngine(self.decoder, max_batch=MAX_BATCH, threads=1, clock=lambda: self.codec_now,
                                  capacity=codec_capacity(), probe_interval_s=None)
        # Codec room is what the worker reports (GetLoad: its capacity, learning from the
        # steps it runs), and a stream holds its seat from its first frame to its last
        # audio (as the token engine sees it: a codec step runs ahead of it by a step).
        self.scheduler = Scheduler(
            SLOTS, 512, self.capacity, pace_lead_s,
            codec_streams_limit=self.codec.capacity.streams,
            codec_streams_open=lambda: sum(
                1 for s in self.streams
                if s.seq.frames and (s.audio_done_at is None or s.audio_done_at > self.token_now)),
        )
        # The fewest streams admission allowed at any step, learned factors included.
        self.least_admissible = min(self.scheduler.admission_limit(), self.codec.capacity.streams())
        self.loop = _Loop()
        self._to_codec: list[_Transit] = []  # frames and ends on their way to the codec worker
        self._to_token: list[_Transit] = []  # audio back (the relay advances the token clock), new requests
        self._order = 0
        self.requests = requests or concurrent
        self.streams: list[Stream] = []
        self._by_seq: dict[Sequence, Stream] = {}
        for i in range(concurrent):
            self._submit(i * stagger_s)

    def jitter(self) -> float:
        return 1.0 + self._jitter * (2.0 * self._rng.random() - 1.0) if self._jitter else 1.0

    def _submit(self, at: float) -> None:
        i = len(self.streams)
        seq = Sequence(
            request_id=f"r{i}", prompt=np.arange(PROMPT_TOKENS, dtype=np.int32),
            sampler=SequenceSampler(SamplingParams(seed=i)), token_budget=FRAMES * orpheus.CODES_PER_FRAME,
            ignore_end_of_speech=True, clock=PlaybackClock(orpheus.SAMPLE_RATE), submitted_at=at,
        )
        stream = Stream(seq.request_id, seq, PlaybackClock(orpheus.SAMPLE_RATE), submitted_at=at)
        self.streams.append(stream)
        self._by_seq[seq] = stream
        self._order += 1
        heapq.heappush(self._to_token, _Transit(at, self._order, ("submit", stream, 0, at)))

    # The token engine's bookkeeping (what engine.Engine does around the plan).

    def token_step(self) -> None:
        now = self.token_now
        while self._to_token and self._to_token[0].at <= now:
            kind, stream, samples, at = heapq.heappop(self._to_token).what
            if kind == "submit":
                self.scheduler.add(stream.seq)
            else:
                stream.seq.clock.deliver(samples, at)
        self.least_admissible = min(self.least_admissible, self.scheduler.admission_limit(),
                                    self.codec.capacity.streams())
        plan = self.scheduler.schedule(now)
        for seq in plan.admitted:
            self._by_seq[seq].admitted_at = now
        if plan.empty:
            resume = self.scheduler.pace_resume_s(plan.paced, now)
            self.token_now = now + min(0.02, resume if resume is not None else 0.02)
            return
        cost = 0.0
        stepped: list[Sequence] = []
        if plan.decode:
            step = backbone_step_s(len(plan.decode)) * self.jitter()
            self.capacity.record(len(plan.decode), step)
            cost += step
            stepped += plan.decode
        for seq, take in plan.prefill:
            cost += prefill_s(take)
            seq.prefilled += take
            if not seq.prefilling:
                stepped.append(seq)  # the prompt's last chunk samples the first token
        self.token_now = end = now + cost
        for seq in stepped:
            seq.generated += 1
            if seq.generated % orpheus.CODES_PER_FRAME == 0:
                seq.frames += 1
                self._send(end, ("frame", self._by_seq[seq]))
            if seq.generated >= seq.token_budget:
                self.scheduler.remove(seq)
                self._send(end, ("finish", self._by_seq[seq]))

    def _send(self, at: float, what) -> None:
        self._order += 1
        heapq.heappush(self._to_codec, _Transit(at, self._order, what))

    # The relay's side of the codec worker.

    def codec_step(self) -> None:
        now = self.codec_now
        while self._to_codec and self._to_codec[0].at <= now:
            kind, stream = heapq.heappop(self._to_codec).what
            if stream.codec is None:
                stream.codec = self._open(stream)
            if kind == "frame":
                stream.codec.submit(np.zeros((1, orpheus.CODES_PER_FRAME), dtype=np.int64))
            else:
                stream.codec.finish()
        wait_s = self.codec.step(self.codec.bridge.wait_for_commands(0))
        self.codec.bridge.flush_events()  # as the bridge does after every step
        # A step that deferred its streams (waiting for a full pass) asks the bridge to
        # wait: until then, or until the next frame arrives, it has nothing to do.
        self.codec_wake = now + wait_s if wait_s else now

    def _open(self, stream: Stream):
        stream.codec = handle = self.codec.open_stream(clock=PlaybackClock(orpheus.SAMPLE_RATE))
        handle.loop = self.loop

        def put(item, stream=stream) -> None:
            at = self.codec_now
            samples = getattr(item, "samples", 0)
            if samples:
                stream.first_audio_at = stream.first_audio_at if stream.first_audio_at is not None else at
                if (stall := stream.listener.deliver(samples, at)) is not None:
                    stream.stalls.append(stall)
                self._order += 1
                heapq.heappush(self._to_token, _Transit(at, self._order, ("audio", stream, samples, at)))
            elif isinstance(item, End):
                stream.audio_done, stream.audio_done_at = True, at
                if len(self.streams) < self.requests:
                    self._submit(at)

        handle._put = put
        return handle

    def run(self, until: float = 120.0) -> None:
        """Steps whichever engine is next in fake time until every stream's audio ended."""

        async def go():  # open_stream wants the event loop its caller awaits on
            while not all(s.audio_done for s in self.streams) or len(self.streams) < self.requests:
                if self.scheduler.has_work() or self.scheduler.has_waiting():
                    token_at = self.token_now
                else:
                    token_at = max(self.token_now, self._to_token[0].at) if self._to_token else math.inf
                if self.codec.has_work():
                    arrival = self._to_codec[0].at if self._to_codec else math.inf
                    codec_at = max(self.codec_now, min(self.codec_wake, arrival))
                else:
                    codec_at = max(self.codec_now, self._to_codec[0].at) if self._to_codec else math.inf
                if min(token_at, codec_at) > until:
                    raise AssertionError("the simulation did not finish")
                if token_at <= codec_at:
                    self.token_now = token_at
                    self.token_step()
                else:
                    self.codec_now = codec_at
                    self.codec_step()

        asyncio.run(go())

    def late(self) -> dict[str, list[tuple[float, float]]]:
        """Each stream's late samples: (seconds after its first audio, seconds late)."""
        return {s.name: [(round(st.due_at - s.first_audio_at, 3), round(st.seconds, 3)) for st in s.stalls]
                for s in self.streams if s.stalls}


def test_n_star_streams_arriving_together_are_all_admitted_at_once_and_none_plays_late():
    sim = Simulation(N_STAR)
    sim.run()
    assert [s.admitted_at for s in sim.streams] == [0.0] * N_STAR  # nobody queued
    assert sim.late() == {}
    # The speed factors learned from the live steps never took admission below N*.
    assert sim.least_admissible >= N_STAR


def test_n_star_streams_kept_in_flight_never_queue_and_never_play_late():
    """As `chorus bench` runs a level: N* requests in flight, each that ends followed by
    the next at once, arriving staggered so that new streams start beside streams with
    lead. Each is admitted at the first token step after it arrives."""
    sim = Simulation(N_STAR, requests=4 * N_STAR, stagger_s=0.7)
    sim.run()
    assert len(sim.streams) == 4 * N_STAR
    longest_step = prefill_s(PROMPT_TOKENS) + backbone_step_s(SLOTS)
    assert all(s.admitted_at - s.submitted_at <= max(IDLE_POLL_S, longest_step) for s in sim.streams)
    assert sim.late() == {}
    assert sim.least_admissible >= N_STAR


def test_one_more_stream_waits_and_no_admitted_stream_plays_late():
    sim = Simulation(N_STAR + 1)
    sim.run()
    first, extra = sim.streams[:N_STAR], sim.streams[N_STAR]
    assert [s.admitted_at for s in first] == [0.0] * N_STAR
    # It waited in the queue until a codec seat freed: a first stream's last audio.
    assert extra.admitted_at >= min(s.audio_done_at for s in first)
    assert sim.late() == {}


@pytest.mark.parametrize("seed", range(6))
def test_a_new_stream_building_lead_beside_streams_with_lead_plays_on_time(seed):
    """The known failure: late samples in a stream's first second, while it builds lead
    from the 150 ms start buffer beside other streams. Step times here vary by +-50%
    (seeded). The stream had just over URGENT_LEAD_S, so it shared the normal pass, and
    that pass took MAX_FRAMES_PER_STEP frames of every stream: longer than its lead.
    Seeds 0, 1 and 3 ran late before the pass was bounded by the least lead."""
    sim = Simulation(N_STAR, requests=4 * N_STAR, stagger_s=0.4, jitter=0.5, seed=seed)
    sim.run()
    assert sim.late() == {}


def test_past_n_star_the_queue_bound_refuses_cleanly():
    """With N* streams admitted, the next request waits while the queue has room and is
    refused once it has none (QueueFullError, which the servicer answers with
    RESOURCE_EXHAUSTED)."""
    for queue_size in (0, 1):
        engine = Engine(FakeBackbone(), slots=SLOTS, n_batch=64, queue_size=queue_size, ctx_per_slot=1024,
                        capacity=token_capacity(), codec_streams_limit=codec_capacity().streams,
                        probe_interval_s=None)
        loop = asyncio.new_event_loop()
        try:
            def submit(i: int):
                prompt = orpheus.wrap_prompt([orpheus.BOS] + [1] * 8)
                return engine.submit(GenerationRequest(f"r{i}", prompt, SamplingParams(seed=i), 7), loop)

            for i in range(N_STAR + queue_size):
                submit(i)
            with pytest.raises(QueueFullError):
                submit(N_STAR + queue_size)
        finally:
            engine.stop()
            loop.close()


# -- who gets the step: a new stream before streams with lead ------------------------

NOW = 100.0


def generating(name: str, lead_s: float | None) -> Sequence:
    """A stream generating, `lead_s` ahead of its listener (None: no audio yet)."""
    clock = PlaybackClock(orpheus.SAMPLE_RATE)
    if lead_s is not None:
        clock = PlaybackClock.scheduled(orpheus.SAMPLE_RATE, NOW + lead_s)
    seq = Sequence(request_id=name, prompt=np.arange(PROMPT_TOKENS, dtype=np.int32),
                   sampler=SequenceSampler(SamplingParams(seed=0)), token_budget=420, ignore_end_of_speech=True,
                   clock=clock, submitted_at=NOW)
    seq.prefilled = PROMPT_TOKENS
    return seq


def test_the_token_scheduler_steps_a_new_stream_while_streams_with_lead_sit_out():
    scheduler = Scheduler(SLOTS, 512, token_capacity(), pace_lead_s=2.0,
                          codec_streams_limit=codec_capacity().streams)
    ahead = [generating("ahead0", 3.0), generating("ahead1", 2.5)]
    new = generating("new", None)
    for i, seq in enumerate([*ahead, new]):
        seq.slot, seq.admitted_at = i, NOW
        scheduler.slots[i] = seq
    plan = scheduler.schedule(NOW)
    assert plan.decode == [new] and plan.paced == ahead


def test_the_decode_engine_serves_a_new_stream_before_streams_with_lead():
    """Two streams with ample lead and a backlog, and a new stream with its first three
    frames: the new stream's audio comes out of the first pass, and the others sit the
    step out while it has none."""

    class SteadyCore:  # the decoder's core, without jitter
        codec_now = NOW

        def jitter(self) -> float:
            return 1.0

    core = SteadyCore()
    engine = DecodeEngine(FakeDecoder(core), max_batch=MAX_BATCH, threads=1, clock=lambda: core.codec_now,
                          probe_interval_s=None)
    delivered: list[str] = []

    async def scenario():
        handles = {}
        for name, lead in (("ahead0", AMPLE_LEAD_S + 1), ("ahead1", AMPLE_LEAD_S + 2), ("new", None)):
            clock = PlaybackClock(orpheus.SAMPLE_RATE)
            if lead is not None:
                clock = PlaybackClock.scheduled(orpheus.SAMPLE_RATE, NOW + lead)
            handle = engine.open_stream(clock=clock)
            handle.loop = _Loop()
            handle._put = lambda item, name=name: isinstance(item, Audio) and delivered.append(name)
            handle.submit(np.zeros((3 if name == "new" else 8, orpheus.CODES_PER_FRAME), dtype=np.int64))
            handles[name] = handle
        engine.step(engine.bridge.wait_for_commands(0))
        engine.bridge.flush_events()
        return handles

    handles = asyncio.run(scenario())
    assert delivered == ["new"]
    assert not handles["new"].pending
    assert all(sum(len(p) for p in handles[n].pending) == 8 for n in ("ahead0", "ahead1"))


def test_a_pass_takes_fewer_frames_while_an_open_stream_has_little_lead():
    """A pass of f frames a stream lasts about f frame times at capacity; it may take no
    more than half the least lead, and never fewer than MIN_FRAMES_PER_STEP (single
    frames would pay a forward's fixed cost per frame, below the ceiling's rate)."""
    frame = orpheus.FRAME_SECONDS
    assert frames_per_stream([], MAX_FRAMES_PER_STEP) == MAX_FRAMES_PER_STEP
    assert frames_per_stream([None, None], MAX_FRAMES_PER_STEP) == MAX_FRAMES_PER_STEP  # no audio yet: no bound
    assert frames_per_stream([2.0, 8 * frame], MAX_FRAMES_PER_STEP) == MAX_FRAMES_PER_STEP
    assert frames_per_stream([2.0, 6.5 * frame, None], MAX_FRAMES_PER_STEP) == 3
    assert frames_per_stream([2.0, 0.31], MAX_FRAMES_PER_STEP) == MIN_FRAMES_PER_STEP  # just past URGENT_LEAD_S
    assert frames_per_stream([2.0, -0.5], MAX_FRAMES_PER_STEP) == MIN_FRAMES_PER_STEP  # already late
    assert frames_per_stream([0.1], 1) == 1  # never above the engine's own bound


# -- codec room as the token server learns it -----------------------------------------


def test_our_own_streams_opened_or_closed_during_a_load_poll_never_take_our_codec_room(monkeypatch):
    """A worker's open_streams, less the streams this server holds, is what other token
    servers hold there. A stream opened while the poll was on its way (the worker counts
    it, the count taken before the poll did not) was counted as another's, and for the
    half second to the next poll it kept an N*-th request waiting. One closed meanwhile,
    which the worker may still count, stays ours as before."""
    from chorus.proto.tts.v1 import codec_pb2
    from services.token_server import codec_pool

    worker = "127.0.0.1:1"
    pool = codec_pool.CodecPool([worker])
    during_poll = {"change": None, "worker_still_has": 0}

    class Stub:
        def __init__(self, channel) -> None:
            pass

        async def GetLoad(self, request, timeout):
            during_poll["change"]()
            held = pool.open_streams() + during_poll["worker_still_has"]
            return codec_pb2.GetLoadResponse(open_streams=held, max_streams=64, capacity_streams=N_STAR)

        def Decode(self):  # the call a stream opens (never used here)
            return None

    monkeypatch.setattr(codec_pool.codec_pb2_grpc, "CodecServiceStub", Stub)

    async def scenario():
        try:
            pool.open(worker)  # a stream held before the poll
            during_poll["change"] = lambda: pool.open(worker)  # a second one starts mid-poll
            await pool.poll()
            assert pool.streams_limit() == N_STAR
            during_poll.update(change=lambda: pool.release(worker), worker_still_has=1)
            await pool.poll()
            assert pool.streams_limit() == N_STAR
        finally:
            await pool.close()

    asyncio.run(scenario())
