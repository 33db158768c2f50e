"""The decode engine: all torch work of a worker in one dedicated thread, most urgent first.

Decoding on the asyncio loop would stall every other stream's network I/O for the
length of a step, and torch gains nothing from several Python threads sharing its
intra-op pool. So the gRPC handlers only post frames to this engine's thread (through
`chorus.realtime.engine_thread`, the bridge the token engine uses too) and await PCM on an
asyncio queue; each step takes what is pending across all streams and decodes it,
streams of the same shape in one forward.

Which streams a step serves is a real-time decision. Every stream carries its
listener's playback clock (DecodeStart.playback), so the engine knows each one's lead
(audio delivered beyond what its listener has played). A step serves the most urgent
streams first: those still waiting for their first audio, then those with the least
lead. It decodes them in two passes, urgent ones (no audio yet, or under
`URGENT_LEAD_S` of lead) first and their audio handed over at once, then the rest, so
one stream's backlog never delays another's first audio; while any stream is urgent,
those with `AMPLE_LEAD_S` in hand sit the step out. At most `max_batch` streams
and `max_frames_per_step` frames a stream go into a step, which bounds how long a
newly arrived urgent stream can wait for the step in progress. Fewer frames while
some open stream has little lead (`frames_per_stream`): a pass of several frames for
every stream lasts about as many frame times, and a stream just past URGENT_LEAD_S
(a new one ramping up from its 150 ms start buffer) ran dry waiting for it.

Cross-stream batching may wait a little (`batch_wait_ms`) for more streams to have
frames ready, but only when nobody in the step is urgent, and not at all when every
open stream is already in it. It pays even on CPU: a step of one frame is bound by
reading the weights, not by arithmetic, so sharing forwards more than doubled
throughput at 8 streams on 2 cores (docs/benchmarks.md).

Step times feed a real-time capacity model (chorus.realtime.capacity: how many streams this
worker can decode at real time), which token servers read through GetLoad to admit
requests, together with the worker's busy ratio and its lag behind real time. With no
stream open and capacity below its limit, the engine probes the next size up now and
then, so that capacity a busy start cost comes back without traffic (issue 22).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Union

import numpy as np
import torch

from chorus.realtime.capacity import PROBE_INTERVAL_S, CapacityProbe, RealTimeCapacity, calibrate as calibrate_capacity
from chorus.realtime.engine_thread import EngineThread
from chorus.realtime.playback import DEFAULT_START_BUFFER_S, PlaybackClock, urgency
from chorus.speech import orpheus
from services.codec_worker.streaming_decoder import StreamingSnacDecoder, StreamState

log = logging.getLogger(__name__)

# A failover resend or a burst can leave many frames pending; bounding a stream's
# share of a step bounds the step, and so the wait of an urgent stream behind it.
MAX_FRAMES_PER_STEP = 4
# A pass bounded by a stream's small lead (frames_per_stream) still takes this many
# frames a stream where they are pending: each forward pays a fixed part, and passes of
# single frames over every stream (an urgent pass, then the rest) can fall below real
# time where the ceiling, the better of 1 or 2 frames a step, holds them.
MIN_FRAMES_PER_STEP = 2
# A stream with less audio than this ahead of its listener is decoded in the urgent pass.
URGENT_LEAD_S = 0.3
# In a step with urgent streams, a stream with at least this much lead sits it out:
# its listener has a second of audio in hand, and the decode time is worth more to a
# stream about to run dry (a new stream ramping up beside others at full capacity ran
# late in its first second when every stream was decoded every step).
AMPLE_LEAD_S = 1.0
# A stream at least this far ahead of its listener, and not finishing, waits until a
# full pass (max_frames_per_step frames) is pending instead of decoding each frame as
# it arrives: a forward pays a fixed part per pass, so one frame a pass decoded 6.2
# audio s/s on one thread where four a pass decoded 8.2 (docs/benchmarks.md, "Real-time
# capacity", "One stream"), time the worker's other streams or neighbours can use. With this much in hand, the wait (at most a full pass of frame times
# at real time) costs its listener nothing; a stream whose lead falls to it is decoded.
THRIFT_LEAD_S = AMPLE_LEAD_S
# The shortest wait a deferred pass asks of the bridge (no busy loop near the edge).
THRIFT_MIN_WAIT_S = 0.002
# Busy ratio and decode rate are averaged over about this much recent time.
LOAD_WINDOW_S = 5.0
# An idle probe (chorus.realtime.capacity.CapacityProbe) measures this many one-frame steps, and
# the idle loop looks this often whether one is due.
PROBE_STEPS = 3
PROBE_POLL_S = 0.5


@dataclass(frozen=True)
class Audio:
    """int16 little-endian PCM from absolute sample `sample_offset`."""

    sample_offset: int
    pcm: bytes

    @property
    def samples(self) -> int:
        return len(self.pcm) // 2


@dataclass(frozen=True)
class End:
    """The stream's tail was flushed; nothing follows."""


@dataclass(frozen=True)
class DecodeFailed:
    """The stream ended in error; nothing follows. `rejected` when the caller sent
    something the stream cannot take, else the engine failed."""

    message: str
    rejected: bool = False


Output = Union[Audio, End, DecodeFailed]


def to_pcm16(samples: np.ndarray) -> bytes:
    return np.clip(np.rint(samples * 32767.0), -32768, 32767).astype("<i2").tobytes()


def is_urgent(lead: float | None) -> bool:
    return lead is None or lead < URGENT_LEAD_S


def frames_per_stream(leads: Iterable[float | None], max_frames: int,
                      frame_seconds: float = orpheus.FRAME_SECONDS) -> int:
    """Frames each stream may take in the next pass, given the leads of the open streams.

    A pass of f frames over streams this worker holds at real time (with the admission
    margin) takes under f frame times, and every open stream waits it out before its
    next audio. So f frame times stay within half the least lead among them: the other
    half covers the pass before it (the urgent one), the next urgent pass and a slow step.
    A stream whose clock has not started (no audio yet) sets no bound: it is the most
    urgent, and served first in the next step either way."""
    started = [lead for lead in leads if lead is not None]
    if not started:
        return max_frames
    within_half_the_lead = int(min(started) / (2.0 * frame_seconds))
    return max(min(MIN_FRAMES_PER_STEP, max_frames), min(max_frames, within_half_the_lead))


def defer_short_passes(ready: list, now: float, full_pass: int) -> tuple[list, float | None]:
    """(the streams to decode now, seconds until a deferred one must be decoded or None):
    a stream with THRIFT_LEAD_S in hand that is not finishing waits while fewer than
    `full_pass` frames are pending."""
    now_ready, waits = [], []
    for stream in ready:
        lead = stream.lead(now)
        if lead is not None and lead >= THRIFT_LEAD_S and not stream.finishing and stream.pending_frames() < full_pass:
            waits.append(lead - THRIFT_LEAD_S)
        else:
            now_ready.append(stream)
    return now_ready, (max(THRIFT_MIN_WAIT_S, min(waits)) if waits else None)


def plan_step(ready: list, now: float, max_batch: int) -> tuple[list, list]:
    """The streams one step decodes, as (urgent pass, the rest): at most `max_batch` of
    those with frames ready, most urgent first (no audio yet, then least lead); while
    some are urgent, those with `AMPLE_LEAD_S` or more wait for a later step."""
    leads = {stream: stream.lead(now) for stream in ready}
    chosen = sorted(ready, key=lambda s: urgency(leads[s]))[:max_batch]
    urgent = [s for s in chosen if is_urgent(leads[s])]
    rest = [s for s in chosen if not is_urgent(leads[s])]
    if urgent:
        rest = [s for s in rest if leads[s] < AMPLE_LEAD_S]
    return urgent, rest


class EngineStream:
    """One stream's handle. Its methods are called from the event loop; its state
    beyond the output queue belongs to the engine thread."""

    def __init__(self, engine: DecodeEngine, loop: asyncio.AbstractEventLoop, state_args: dict,
                 clock: PlaybackClock) -> None:
        self._engine = engine
        self.loop = loop
        self._outputs: asyncio.Queue[Output] = asyncio.Queue()
        self._closed = False  # no more frames from the caller (finished, cancelled or rejected)
        # Engine thread only:
        self.state_args = state_args
        self.clock = clock
        self.state: StreamState | None = None
        self.pending: list[np.ndarray] = []
        self.finishing = False

    def submit(self, frames: np.ndarray) -> None:
        """Queues validated (n, 7) frames, consecutive with those before."""
        if self._closed:
            raise RuntimeError("stream already finished")
        self._engine.bridge.post(_Frames(self, frames))

    def finish(self) -> None:
        """The caller half-closed: decode what is pending, then flush the tail."""
        if not self._closed:
            self._closed = True
            self._engine.bridge.post_if_alive(_Finish(self))

    def cancel(self) -> None:
        """Drops the stream and its decoder state; no more output."""
        self._closed = True
        self._engine.bridge.post_if_alive(_Cancel(self))

    def reject(self, message: str) -> None:
        """Ends the stream for a caller error, after the audio already queued."""
        self.cancel()
        self._outputs.put_nowait(DecodeFailed(message, rejected=True))

    async def get(self) -> Output:
        return await self._outputs.get()

    def _put(self, item: Output) -> None:
        self._outputs.put_nowait(item)

    # Engine thread side.

    def lead(self, now: float) -> float | None:
        return self.clock.lead(now)

    def pending_frames(self) -> int:
        return sum(len(frames) for frames in self.pending)

    def take(self, limit: int) -> np.ndarray | None:
        if not self.pending:
            return None
        frames = self.pending[0] if len(self.pending) == 1 else np.concatenate(self.pending)
        taken, rest = frames[:limit], frames[limit:]
        self.pending = [rest] if len(rest) else []
        return taken


@dataclass(frozen=True)
class _Open:
    stream: EngineStream


@dataclass(frozen=True)
class _Frames:
    stream: EngineStream
    frames: np.ndarray


@dataclass(frozen=True)
class _Finish:
    stream: EngineStream


@dataclass(frozen=True)
class _Cancel:
    stream: EngineStream


Command = _Open | _Frames | _Finish | _Cancel


@dataclass
class EngineStats:
    steps: int = 0
    forwards: int = 0
    frames: int = 0
    streams_stepped: int = 0


class _LoadMeter:
    """Busy ratio and audio decoded per busy second over a sliding window."""

    def __init__(self, window_s: float = LOAD_WINDOW_S) -> None:
        self._window = window_s
        self._since = time.monotonic()
        self._busy = 0.0
        self._audio = 0.0
        self.busy_ratio = 0.0
        self.decode_rate = 0.0

    def add(self, busy_s: float, audio_s: float, now: float) -> None:
        self._busy += busy_s
        self._audio += audio_s
        self.roll(now)

    def roll(self, now: float) -> None:
        elapsed = now - self._since
        if elapsed < self._window:
            return
        self.busy_ratio = min(1.0, self._busy / elapsed)
        self.decode_rate = self._audio / self._busy if self._busy else 0.0
        self._since, self._busy, self._audio = now, 0.0, 0.0


class DecodeEngine:
    def __init__(
        self,
        decoder: StreamingSnacDecoder,
        max_batch: int = 16,
        batch_wait_ms: float = 0.0,
        threads: int | None = None,  # most torch threads a step may use; None: torch's default
        max_frames_per_step: int = MAX_FRAMES_PER_STEP,
        on_forward: Callable[[int], None] = lambda streams: None,  # streams in each forward, for metrics
        capacity: RealTimeCapacity | None = None,
        clock: Callable[[], float] = time.monotonic,
        probe_interval_s: float | None = PROBE_INTERVAL_S,
    ) -> None:
        self.decoder = decoder
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_ms / 1000.0
        self.threads = threads or torch.get_num_threads()
        self.max_frames_per_step = max_frames_per_step
        self.on_forward = on_forward
        self.capacity = capacity or RealTimeCapacity(decoder.frame_seconds, max_batch)
        self.stats = EngineStats()
        self.load = _LoadMeter()
        self._clock = clock
        self._streams: list[EngineStream] = []  # engine thread only
        self._open_count = 0  # streams holding decoder state, readable from any thread
        self.lag_seconds = 0.0
        # Re-measures the size capacity lost while no stream is open (chorus.realtime.capacity);
        # None: never. The idle loop looks twice a second whether one is due.
        self.probe = CapacityProbe(self.capacity, probe_interval_s, clock, "decode engine")
        self._probe_rng = np.random.default_rng(0)
        idle_poll_s = None if probe_interval_s is None else PROBE_POLL_S
        self.bridge: EngineThread[Command] = EngineThread("codec-decode", self, idle_poll_s=idle_poll_s)

    # -- the event loop's side ---------------------------------------------------

    def start(self) -> None:
        torch.set_num_threads(self.threads)
        self.bridge.start()

    def stop(self) -> None:
        """Ends the thread; streams still open get DecodeFailed. Blocks: call off the loop."""
        self.bridge.stop()

    async def aclose(self) -> None:
        await asyncio.to_thread(self.stop)

    def open_stream(
        self,
        first_frame_index: int = 0,
        resume_from_sample: int = 0,
        deterministic: bool = False,
        clock: PlaybackClock | None = None,
        seed: int = 0,
    ) -> EngineStream:
        """Must be called on the event loop that will await the stream's output.
        Raises ValueError when the decoder cannot start a stream there, the bridge's
        EngineStopped/EngineDead when the engine takes no work."""
        self.decoder.check_start(first_frame_index, resume_from_sample, seed)
        stream = EngineStream(
            self,
            asyncio.get_running_loop(),
            dict(
                first_frame_index=first_frame_index,
                resume_from_sample=resume_from_sample,
                deterministic=deterministic,
                seed=seed,
            ),
            clock or PlaybackClock(self.decoder.sample_rate, DEFAULT_START_BUFFER_S),
        )
        self.bridge.post(_Open(stream))
        return stream

    @property
    def open_streams(self) -> int:
        """Streams holding decoder state (cancelled ones leave at the next step)."""
        return self._open_count

    # -- the engine thread (called by the bridge) ---------------------------------

    def has_work(self) -> bool:
        return any(s.pending or s.finishing for s in self._streams)

    def has_pending(self) -> bool:
        return self._probe_due()

    def _probe_due(self) -> bool:
        return not self._streams and self.probe.due()

    def fail_all(self, message: str, commands: list[Command]) -> None:
        failed = {id(s) for s in self._streams}
        for stream in self._streams:
            stream.state = None
            self._emit(stream, DecodeFailed(message))
        self._streams = []
        self._open_count = 0
        for command in commands:
            if isinstance(command, _Open) and id(command.stream) not in failed:
                self._emit(command.stream, DecodeFailed(message))

    def step(self, commands: list[Command]) -> float | None:
        for command in commands:
            self._apply(command)
        if not commands and self._probe_due():
            self.probe.run(lambda size: self._measure(size, PROBE_STEPS, self._probe_rng))
            return None
        now = self._clock()
        ready, deferred_s = defer_short_passes([s for s in self._streams if s.pending], now, self.max_frames_per_step)
        if ready and self.batch_wait_s > 0:
            ready = self._wait_for_company(ready, now)
            now = self._clock()
        flush = [s for s in self._streams if s.finishing and not s.pending]
        self._update_lag(now)
        if not ready and not flush:
            return deferred_s
        self.stats.steps += 1
        failed: set[EngineStream] = set()
        for tier in plan_step(ready, now, self.max_batch):
            if tier:
                # Leads now, after the pass before this one delivered its audio.
                now = self._clock()
                limit = frames_per_stream((s.lead(now) for s in self._streams), self.max_frames_per_step,
                                          self.decoder.frame_seconds)
                failed |= self._decode(tier, limit)
        for stream in flush:
            if stream not in failed:
                self._flush(stream)
        return None

    # -- commands ----------------------------------------------------------------

    def _apply(self, command: Command) -> None:
        stream = command.stream
        if isinstance(command, _Open):
            self._streams.append(stream)
            self._open_count = len(self._streams)
        elif isinstance(command, _Frames):
            if stream in self._streams:
                stream.pending.append(command.frames)
        elif isinstance(command, _Finish):
            stream.finishing = True
        elif isinstance(command, _Cancel):
            self._drop(stream)

    def _drop(self, stream: EngineStream) -> None:
        if stream in self._streams:
            self._streams.remove(stream)
            self._open_count = len(self._streams)
        stream.pending = []
        stream.finishing = False
        stream.state = None  # its caches go now, not when the handler lets go

    def _wait_for_company(self, ready: list[EngineStream], now: float) -> list[EngineStream]:
        """Bounded wait for more streams to have frames, so they share a forward; never
        while a ready stream is urgent."""
        deadline = now + self.batch_wait_s
        while len(ready) < min(self.max_batch, len(self._streams)):
            if any(is_urgent(s.lead(now)) for s in ready):
                break
            remaining = deadline - now
            if remaining <= 0:
                break
            for command in self.bridge.wait_for_commands(remaining):
                self._apply(command)
            now = self._clock()
            ready = [s for s in self._streams if s.pending]
        return ready

    # -- decoding ------------------------------------------------------------------

    def _decode(self, tier: list[EngineStream], frames_limit: int) -> set[EngineStream]:
        """Decodes one pass, at most `frames_limit` frames a stream, and hands its audio
        over at once; returns streams that failed."""
        work = [(s, s.take(frames_limit)) for s in tier]
        if self.decoder.device.type == "cpu":
            # A frame of one stream is too little work to split: its ops are small
            # and a second thread only adds sync (1 stream ran at 2.2x real time on
            # 2 threads, 3.2x on 1). Bigger steps do gain, so threads follow the work.
            torch.set_num_threads(min(self.threads, sum(len(f) for _, f in work)))
        for stream, _ in work:
            if stream.state is None:
                stream.state = self.decoder.new_stream(**stream.state_args)
        # On the engine's clock (monotonic unless a test fakes it), so that fake step
        # times drive the capacity model as real ones do.
        started = self._clock()
        try:
            chunks = self.decoder.decode([(s.state, f) for s, f in work], self.max_batch)
        except Exception as err:  # one bad step must not take the worker down
            log.exception("decode step failed for %d streams", len(work))
            failed = {s for s, _ in work}
            for stream in failed:
                self._end(stream, DecodeFailed(f"decode failed: {err}"))
            return failed
        now = self._clock()
        elapsed = now - started
        frames = sum(len(f) for _, f in work)
        for streams in self.decoder.last_batch_sizes:
            self.on_forward(streams)
        self.stats.forwards += len(self.decoder.last_batch_sizes)
        self.stats.streams_stepped += len(work)
        self.stats.frames += frames
        self.capacity.record(len(work), elapsed, units=max(1, round(frames / len(work))))
        self.load.add(elapsed, frames * self.decoder.frame_seconds, now)
        for (stream, _), chunk in zip(work, chunks):
            if chunk is not None:
                self._deliver(stream, chunk, now)
        self.bridge.flush_events()
        return set()

    def _flush(self, stream: EngineStream) -> None:
        try:
            chunk = self.decoder.flush(stream.state) if stream.state is not None else None
        except Exception as err:
            log.exception("flush failed")
            self._end(stream, DecodeFailed(f"flush failed: {err}"))
            return
        if chunk is not None:
            self._deliver(stream, chunk, self._clock())
        self._end(stream, End())

    def _deliver(self, stream: EngineStream, chunk, now: float) -> None:
        pcm = to_pcm16(chunk.samples)
        stream.clock.deliver(len(pcm) // 2, now)
        self._emit(stream, Audio(chunk.sample_offset, pcm))

    def _end(self, stream: EngineStream, event: Output) -> None:
        self._drop(stream)
        self._emit(stream, event)

    def _emit(self, stream: EngineStream, event: Output) -> None:
        self.bridge.events.add(stream.loop, stream._put, event)

    def _update_lag(self, now: float) -> None:
        leads = [lead for s in self._streams if (lead := s.lead(now)) is not None]
        self.lag_seconds = max(0.0, -min(leads)) if leads else 0.0
        self.load.roll(now)

    # -- calibration -----------------------------------------------------------------

    def calibrate(self, sizes: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 12, 16), steps: int = 3) -> dict[int, float]:
        """Measures one-frame steps at several batch sizes (before serving, on the
        thread that will decode), so that capacity is known before the first stream: in
        interleaved rounds whose median each size keeps (chorus.realtime.capacity.calibrate)."""
        rng = np.random.default_rng(0)
        measured = calibrate_capacity(
            self.capacity, lambda size: self._measure(size, steps, rng), [s for s in sizes if s <= self.max_batch]
        )
        self.probe.restart()
        return measured

    def _measure(self, size: int, steps: int, rng: np.random.Generator) -> float:
        """Median seconds a frame of `steps` steps over `size` fresh streams. A step
        takes the decoder's `calibration_frames` frames a stream (1 for SNAC; a
        windowed decoder costs a window a chunk, so it steps a chunk)."""
        torch.set_num_threads(self.threads)  # a live step may have left fewer
        decoder = self.decoder
        per_step = getattr(decoder, "calibration_frames", 1)
        states = [decoder.new_stream() for _ in range(size)]
        elapsed = []
        for step in range(steps + 1):
            frames = rng.integers(0, decoder.codebook_size, (size, per_step, decoder.codes_per_frame))
            started = time.perf_counter()
            decoder.decode([(state, frames[i]) for i, state in enumerate(states)], self.max_batch)
            if step:  # the first step of a stream primes its caches
                elapsed.append((time.perf_counter() - started) / per_step)
        return float(np.median(elapsed))
