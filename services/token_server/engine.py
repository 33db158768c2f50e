"""The token engine: executes the scheduler's plan on llama.cpp, one step at a time.

One thread owns the llama context (through `chorus.realtime.engine_thread`, the bridge the
codec worker's decode engine uses too). Each step it takes the commands the event loop
posted (submit, cancel), asks the scheduler (scheduler.py) for a plan, and runs it:
one `llama_decode` with a token for every generating slot, sampling, then each prefill
chunk in its own `llama_decode`. What it sampled goes back to the scheduler
(`update_from_output`), which keeps every sequence's state and returns the events; the
engine delivers them to the requests' handles, all of a step's events in one hand-over
to the loop. Nothing here knows about gRPC: the RPC layer submits requests and awaits
their events.

A request's own bad luck fails that request alone: a sampling error is retried row by
row and only the rows that fail end (Failed), and a llama_decode that fails ends the
sequences in that call. Anything else is an engine bug: the bridge marks the engine
dead, fails every request it holds and refuses new ones, and the server reports
NOT_SERVING.

Step times feed the real-time capacity model (chorus.realtime.capacity) that admission reads;
`calibrate` measures every batch size at start (interleaved rounds, medians) so that
admission knows the machine before the first request, and an idle engine below its
slot count probes the next size up now and then, so that capacity lost to a transient
comes back without traffic at the size it lost.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from chorus.realtime.capacity import PROBE_INTERVAL_S, CapacityProbe, RealTimeCapacity, calibrate as calibrate_capacity
from chorus.realtime.engine_thread import EngineThread
from chorus.realtime.playback import DEFAULT_START_BUFFER_S, PlaybackClock, Stall
from chorus.speech import orpheus
from chorus.speech.family import SpeechFamily
from services.token_server.llama_backend import LlamaBackbone, TokenBatch
from services.token_server.request import (
    EngineEvent,
    Finished,
    GenerationFailed,
    GenerationRequest,
    PromptTooLongError,
    QueueFullError,
    RequestStats,
    SampledToken,
    Sequence,
    SequenceOutput,
    SequenceStatus,
)
from services.token_server.sampler import SamplingParams, SequenceSampler, gather_legal_logits, sample
from services.token_server.scheduler import Scheduler, StepPlan

log = logging.getLogger(__name__)

# Steps an idle probe of the next batch size measures (chorus.realtime.capacity.CapacityProbe).
PROBE_STEPS = 3
# The longest the engine thread waits, with requests it cannot run yet, before it looks
# again: codec room changes with no command to say so (the pool is polled), so this is
# how late a freed codec seat can be seen; a wait costs a step of Python, not a core.
IDLE_POLL_S = 0.02


def token_seconds(family: SpeechFamily) -> float:
    """Audio seconds one token of the family carries: the unit real-time capacity counts in."""
    return 1.0 / family.tokens_per_audio_second


TOKEN_SECONDS = token_seconds(orpheus.FAMILY)  # Orpheus's, for its benchmarks and tests


class RequestHandle:
    """The asyncio side of a request: its event stream, its clock, and a way to cancel it.

    `clock` belongs to the event loop, which advances it as audio is relayed (`deliver`);
    the engine thread paces by its own copy (Sequence.clock). A clock shared by the two
    threads would be read mid-update; instead the loop hands the engine a fresh copy
    with its commands, the same ordered channel as submit and cancel, and only when the
    copy would differ in what the engine reads: pacing reads when playback starts
    (lead counts the frames generated itself), and that moves only at the first audio
    and at a stall, so a handover is a command or two per request, not one per chunk."""

    def __init__(self, engine: Engine, request: GenerationRequest, loop: asyncio.AbstractEventLoop, now: float) -> None:
        self.request = request
        self.stats = RequestStats(submitted_at=now, prompt_tokens=len(request.prompt))
        self.clock = request.playback or PlaybackClock(engine.family.sample_rate, DEFAULT_START_BUFFER_S)
        self.loop = loop
        self._engine = engine
        self._events: asyncio.Queue[EngineEvent] = asyncio.Queue()
        self._done = False
        self._handed_start_at = self.clock.start_at

    def engine_clock(self) -> PlaybackClock:
        """A copy of the clock for the engine thread, which the loop never touches again."""
        self._handed_start_at = self.clock.start_at
        return copy.copy(self.clock)

    def deliver(self, samples: int, now: float) -> Stall | None:
        """`samples` more reached the listener at `now` (the event loop's side); the
        engine gets the new schedule if its start moved."""
        stall = self.clock.deliver(samples, now)
        if self.clock.start_at != self._handed_start_at and not self._done:
            self._engine._bridge.post_if_alive(_Playback(self, self.engine_clock()))
        return stall

    def _put(self, event: EngineEvent) -> None:
        self._events.put_nowait(event)

    async def events(self):
        """Frames in order, then one Finished or GenerationFailed."""
        while not self._done:
            event = await self._events.get()
            if isinstance(event, (Finished, GenerationFailed)):
                self._done = True
            yield event

    def cancel(self) -> None:
        """Frees the slot and KV before the engine's next step. Idempotent."""
        if not self._done:
            self._done = True
            self._engine._bridge.post_if_alive(_Cancel(self))


@dataclass(frozen=True)
class _Submit:
    handle: RequestHandle
    clock: PlaybackClock  # the engine's copy of handle.clock


@dataclass(frozen=True)
class _Playback:
    handle: RequestHandle
    clock: PlaybackClock  # replaces the engine's copy


@dataclass(frozen=True)
class _Cancel:
    handle: RequestHandle


@dataclass(frozen=True)
class _Call:
    fn: Callable[[Engine], object]
    future: concurrent.futures.Future


Command = _Submit | _Playback | _Cancel | _Call


class Engine:
    """N slots over one llama context, stepped on a dedicated thread."""

    def __init__(
        self,
        backbone: LlamaBackbone,
        slots: int,
        n_batch: int,
        queue_size: int,
        ctx_per_slot: int,
        on_decode: Callable[[int], None] | None = None,
        capacity: RealTimeCapacity | None = None,
        pace_lead_s: float | None = 2.0,
        codec_streams_limit: Callable[[], int | float] = lambda: float("inf"),
        codec_streams_open: Callable[[], int] = lambda: 0,
        clock: Callable[[], float] = time.monotonic,
        probe_interval_s: float | None = PROBE_INTERVAL_S,
        family: SpeechFamily = orpheus.FAMILY,
    ) -> None:
        self.family = family
        self.backbone = backbone
        self.n_slots = slots
        self.n_batch = n_batch
        self.queue_size = queue_size
        self.ctx_per_slot = ctx_per_slot
        self.capacity = capacity or RealTimeCapacity(token_seconds(family), slots)
        if self.capacity.limit > slots:
            # Calibration and probes measure sizes up to the limit in real slots.
            raise ValueError(f"capacity limit {self.capacity.limit} is more than the {slots} slots")
        self.scheduler = Scheduler(slots, n_batch, self.capacity, pace_lead_s, codec_streams_limit, codec_streams_open,
                                   family)
        self._clock = clock
        self._batch = TokenBatch(n_batch, slots)
        self._bridge: EngineThread[Command] = EngineThread("token-engine", self, idle_poll_s=IDLE_POLL_S)
        self._count_lock = threading.Lock()
        self._in_system = 0  # admitted + waiting, counted on submit and on the end
        self._in_system_codec = 0  # of those, requests that need a codec stream
        self._by_handle: dict[RequestHandle, Sequence] = {}
        self._failed_handles: set[RequestHandle] = set()  # ended by fail_all
        self.steps = 0
        # Wall time inside llama_decode vs. the whole loop: the Python around it is the rest.
        self.decode_seconds = 0.0
        self.busy_seconds = 0.0
        self.paced_steps = 0
        # Called on the engine thread with each llama_decode's token count (metrics).
        self._on_decode = on_decode
        # Re-measures the size capacity lost while idle; None: never (capacity then
        # moves only with live steps).
        self.probe = CapacityProbe(self.capacity, probe_interval_s, clock, "token engine")

    # -- the event loop's side ---------------------------------------------------

    @property
    def bridge(self) -> EngineThread[Command]:
        return self._bridge

    def submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None = None) -> RequestHandle:
        """Queues a request; raises QueueFullError, PromptTooLongError, or the bridge's
        EngineStopped/EngineDead at once."""
        self.check_fits(request)
        handle = RequestHandle(self, request, loop or asyncio.get_running_loop(), self._clock())
        with self._count_lock:
            held = self._held(request.needs_codec or self._in_system_codec > 0)
            if self._in_system >= held + self.queue_size:
                raise QueueFullError(
                    f"this token server holds {held} streams at real time and {self.queue_size} more may wait; "
                    "all are taken: retry with backoff or on another token server"
                )
            self._in_system += 1
            self._in_system_codec += request.needs_codec
        try:
            self._bridge.post(_Submit(handle, handle.engine_clock()))
        except Exception:
            self._leave(request.needs_codec)
            raise
        return handle

    def check_fits(self, request: GenerationRequest) -> None:
        """Raises PromptTooLongError when the prompt and its budget do not fit a slot.
        `submit` asks it; the RPC layer asks it first too, so that a request no slot can
        hold is refused as bad input before it waits for anything (codec workers)."""
        if request.token_budget > self.token_room(len(request.prompt)):
            raise PromptTooLongError(
                f"text is too long for one request: its prompt of {len(request.prompt)} tokens plus a budget of "
                f"{request.token_budget} tokens needs {len(request.prompt) + request.token_budget + 1} positions, "
                f"more than a slot's context of {self.ctx_per_slot}; "
                "send shorter text (the gateway splits long text into sentences)"
            )

    def token_room(self, prompt_tokens: int) -> int:
        """The most tokens a request with this prompt may generate in a slot (the last
        sampled token needs a position too). submit refuses a budget over it."""
        return self.ctx_per_slot - prompt_tokens - 1

    def run_in_engine(self, fn: Callable[[Engine], object]) -> concurrent.futures.Future:
        """Runs fn(engine) on the engine thread between two steps (calibration, inspection)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._bridge.post(_Call(fn, future))
        return future

    def load(self) -> tuple[int, int]:
        """(busy slots, waiting requests); read without stopping the loop. Requests the
        next step admits (capacity and codec room free for them) are not waiting."""
        busy = sum(1 for s in self.scheduler.slots if s is not None)
        with self._count_lock:
            in_system = self._in_system
            held = self._held(self._in_system_codec > 0)
        return busy, max(0, in_system - held)

    def _held(self, codec_needed: bool) -> int:
        """Requests in the system that are not waiting: those in slots, and those the next
        step admits. Codec room counts only while some request needs a codec stream
        (codes-only requests are admitted whatever the codec workers hold)."""
        busy = sum(1 for s in self.scheduler.slots if s is not None)
        startable = self.scheduler.startable_limit() if codec_needed else self.scheduler.admission_limit()
        return max(busy, startable)

    @property
    def alive(self) -> bool:
        return self._bridge.alive

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        self._bridge.start()

    def stop(self) -> None:
        """Ends the loop; requests still inside get GenerationFailed. Blocks: call off the loop."""
        self._bridge.stop()
        self._batch.free()

    # -- the engine thread (called by the bridge) ---------------------------------

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def has_pending(self) -> bool:
        # A due probe wakes the idle loop as waiting requests do.
        return self.scheduler.has_waiting() or self._probe_due()

    def _probe_due(self) -> bool:
        return not self.scheduler.has_work() and not self.scheduler.has_waiting() and self.probe.due()

    def step(self, commands: list[Command]) -> float | None:
        for command in commands:
            self._apply(command)
        if not commands and self._probe_due():
            self.probe.run(lambda size: self._measure(size, PROBE_STEPS))
            return None
        started = time.perf_counter()
        now = self._clock()
        plan = self.scheduler.schedule(now)
        for seq in plan.admitted:
            self.backbone.clear_sequence(seq.slot)
        for seq in self.scheduler.over_queue(self.queue_size):
            self._finish_failed(
                seq, "this token server's real-time capacity fell while this request waited, and its queue is over "
                f"its bound of {self.queue_size}: try another token server")
        if plan.empty:
            return self._idle_wait(plan, now)
        self.paced_steps += len(plan.paced)
        for output in self.scheduler.update_from_output(plan, self._run(plan)):
            self._deliver(output)
        self.steps += 1
        self.busy_seconds += time.perf_counter() - started
        return None

    def _idle_wait(self, plan: StepPlan, now: float) -> float | None:
        """How long the bridge waits for a command after a step with nothing to run: with
        streams in slots it would otherwise step again at once (has_work holds), so until
        the first paced stream needs the step again, at most IDLE_POLL_S (codec room is
        polled). With no slot busy the bridge's own idle wait applies."""
        if not self.scheduler.has_work():
            return None
        resume_s = self.scheduler.pace_resume_s(plan.paced, now)
        return IDLE_POLL_S if resume_s is None else min(IDLE_POLL_S, resume_s)

    def fail_all(self, message: str, commands: list[Command]) -> None:
        self._failed_handles = set()
        for seq in [*self.scheduler.running, *self.scheduler.waiting]:
            self._failed_handles.add(seq.owner)
            try:
                self._finish_failed(seq, message)
            except Exception:  # the backbone may be what broke: the request still ends
                self._emit(seq.owner, GenerationFailed(message))
        for command in commands:
            if isinstance(command, _Submit) and command.handle not in self._failed_handles:
                self._leave(command.handle.request.needs_codec)
                self._emit(command.handle, GenerationFailed(message))
            elif isinstance(command, _Call) and not command.future.done():
                command.future.set_exception(RuntimeError(message))

    # -- commands ----------------------------------------------------------------

    def _apply(self, command: Command) -> None:
        if isinstance(command, _Submit):
            handle = command.handle
            req = handle.request
            seq = Sequence(
                request_id=req.request_id,
                prompt=np.asarray(req.prompt, dtype=np.int32),
                sampler=SequenceSampler(req.sampling, self.family),
                token_budget=req.token_budget,
                ignore_end_of_speech=req.ignore_end_of_speech,
                clock=command.clock,
                submitted_at=handle.stats.submitted_at,
                needs_codec=req.needs_codec,
                owner=handle,
                stats=handle.stats,
                samples_per_frame=self.family.samples_per_frame,
            )
            self._by_handle[handle] = seq
            self.scheduler.add(seq)
        elif isinstance(command, _Playback):
            seq = self._by_handle.get(command.handle)
            if seq is not None:
                seq.clock = command.clock
        elif isinstance(command, _Cancel):
            seq = self._by_handle.pop(command.handle, None)
            if seq is not None:  # else it already ended: nothing holds resources
                self._free(seq, SequenceStatus.FINISHED_ABORTED)
        elif isinstance(command, _Call):
            try:
                command.future.set_result(command.fn(self))
            except Exception as exc:
                command.future.set_exception(exc)

    # -- running a plan ----------------------------------------------------------

    def _run(self, plan: StepPlan) -> list[SampledToken]:
        """A token for every generating slot in the plan (one llama_decode), then each
        prefill chunk in its own llama_decode; returns what was sampled.

        With a KV stream per sequence llama.cpp splits a mixed batch into ubatches of
        equal tokens per sequence anyway (so the passes over the weights are the same),
        and separate calls keep a prompt's chunking independent of what else runs."""
        batch = self._batch
        sampled: list[SampledToken] = []
        if plan.decode:
            started = time.perf_counter()
            batch.clear()
            rows = []
            for seq in plan.decode:
                rows.append((seq, batch.add([seq.last_token], seq.next_pos, seq.slot, True)))
                seq.next_pos += 1
            if self._decode(batch, plan.decode):
                sampled += self._sample(rows)
            # Only steps of generating tokens measure real-time capacity; prefill is
            # paid once per request and covered by the margin.
            self.capacity.record(len(plan.decode), time.perf_counter() - started)
        for seq, take in plan.prefill:
            if seq.status.finished:  # ended earlier in this step
                continue
            done = seq.prefilled + take == len(seq.prompt)
            batch.clear()
            index = batch.add(seq.prompt[seq.prefilled : seq.prefilled + take], seq.prefilled, seq.slot, done)
            seq.prefilled += take
            if not self._decode(batch, [seq]):
                continue
            if done:
                seq.next_pos = len(seq.prompt)
                sampled += self._sample([(seq, index)])
        return sampled

    def _decode(self, batch: TokenBatch, members: list[Sequence]) -> bool:
        """One llama_decode; on failure the sequences in it end, the engine goes on."""
        started = time.perf_counter()
        try:
            self.backbone.decode(batch)
        except RuntimeError as err:
            log.error("llama_decode failed for %s: %s", ", ".join(s.request_id for s in members), err)
            for seq in members:
                self._finish_failed(seq, f"the backbone failed on this request: {err}")
            return False
        finally:
            self.decode_seconds += time.perf_counter() - started
        if self._on_decode is not None:
            self._on_decode(batch.n_tokens)
        return True

    def _sample(self, rows: list[tuple[Sequence, int]]) -> list[SampledToken]:
        seqs = [s for s, _ in rows]
        generated = np.array([s.generated for s in seqs])
        family = self.family
        positions = generated % family.codes_per_frame
        eos_allowed = (positions == 0) & (generated > 0)
        eos_allowed &= np.array([not s.ignore_end_of_speech for s in seqs])
        logits = [self.backbone.logits_at(i) for _, i in rows]
        try:
            choices = sample(gather_legal_logits(logits, positions, family), [s.sampler for s in seqs], positions,
                             eos_allowed)
            picked = list(zip(seqs, positions.tolist(), choices.tolist()))
        except Exception:
            # One request's numbers broke the batch: sample row by row and fail only
            # the rows that fail. Each row uses its own generator, so the others get
            # the tokens they would have had.
            picked = []
            for k, seq in enumerate(seqs):
                try:
                    choice = sample(gather_legal_logits([logits[k]], positions[k : k + 1], family), [seq.sampler],
                                    positions[k : k + 1], eos_allowed[k : k + 1])
                    picked.append((seq, int(positions[k]), int(choice[0])))
                except Exception as err:
                    log.exception("sampling failed for %s", seq.request_id)
                    self._finish_failed(seq, f"sampling failed for this request: {err}")
        now = self._clock()
        return [SampledToken(seq, position, choice, now) for seq, position, choice in picked]

    # -- delivery and endings --------------------------------------------------------

    def _deliver(self, output: SequenceOutput) -> None:
        seq = output.seq
        if output.final:
            self._by_handle.pop(seq.owner, None)
            self._release(seq, output.freed_slot)
        self._emit(seq.owner, output.event)

    def _finish_failed(self, seq: Sequence, message: str) -> None:
        self._by_handle.pop(seq.owner, None)
        self._free(seq, SequenceStatus.FINISHED_FAILED)
        self._emit(seq.owner, GenerationFailed(message))

    def _free(self, seq: Sequence, status: SequenceStatus) -> None:
        """Ends the sequence in the scheduler and clears its KV before the next step."""
        slot = seq.slot
        held = self.scheduler.remove(seq, status)
        self._release(seq, slot if held else None)

    def _release(self, seq: Sequence, slot: int | None) -> None:
        if slot is not None:
            self.backbone.clear_sequence(slot)
        self._leave(seq.needs_codec)

    def _leave(self, needs_codec: bool) -> None:
        with self._count_lock:
            self._in_system -= 1
            self._in_system_codec -= needs_codec

    def _emit(self, handle: RequestHandle, event: EngineEvent) -> None:
        self._bridge.events.add(handle.loop, handle._put, event)

    # -- calibration ---------------------------------------------------------------

    def calibrate(self, steps: int = 4) -> dict[int, float]:
        """Measures a generating step at every batch size (engine thread only, before
        serving), in interleaved rounds whose median each size keeps (chorus.realtime.capacity.
        calibrate says why). Returns seconds per step by batch size."""
        if self.scheduler.has_work() or self.scheduler.has_waiting():
            raise RuntimeError("calibrate only an idle engine")
        measured = calibrate_capacity(self.capacity, lambda size: self._measure(size, steps), range(1, self.n_slots + 1))
        self.probe.restart()
        return measured

    def _measure(self, size: int, steps: int) -> float:
        """Median seconds of `steps` decode-and-sample steps over `size` slots (the engine
        must be idle: it borrows the first `size` slots and clears them after)."""
        family = self.family
        # Any prompt of a typical length serves: a step's time depends on the context's length, not its tokens.
        prompt = np.full(15, family.code_token_id(1, 0), dtype=np.int32)
        samplers = [SequenceSampler(SamplingParams(seed=0), family) for _ in range(size)]
        for slot in range(size):
            self.backbone.clear_sequence(slot)
            self._batch.clear()
            self._batch.add(prompt, 0, slot, True)
            self.backbone.decode(self._batch)
        elapsed = []
        for step in range(steps + 1):
            started = time.perf_counter()
            self._batch.clear()
            position = step % family.codes_per_frame
            indices = [self._batch.add([family.code_token_id(0, position)], len(prompt) + step, slot, True)
                       for slot in range(size)]
            self.backbone.decode(self._batch)
            positions = np.full(size, position)
            legal = gather_legal_logits([self.backbone.logits_at(i) for i in indices], positions, family)
            sample(legal, samplers, positions, np.zeros(size, dtype=bool))
            if step:  # the first step of a size warms caches
                elapsed.append(time.perf_counter() - started)
        for slot in range(size):
            self.backbone.clear_sequence(slot)
        return float(np.median(elapsed))
