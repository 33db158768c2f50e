"""Decides each step of the token engine: who joins, who generates, who prefills.

The split follows vLLM v1 (a scheduler plans a step, the engine core executes it): the
scheduler owns the waiting queue and the slots and returns a `StepPlan` from
`schedule`; the engine (engine.py) runs the plan on llama.cpp, samples, and hands the
picks to `update_from_output`, which advances every sequence (frames, end of speech,
budget, timestamps, status) and returns the events the engine delivers. Nothing here
touches llama.cpp, so every decision and every token's bookkeeping is testable with a
fake clock.

Three decisions, each for real time rather than for throughput alone:

- Admission by capacity. A waiting request gets a slot only while the streams in
  slots are fewer than the real-time capacity (`RealTimeCapacity`, learned from this
  engine's step times) and, if it needs a codec stream (codes-only requests do not),
  the codec pool has room for one more. Past that it
  waits: admitting it would slow every running stream below real time, so that all of
  them stall instead of none. At the capacity model's margin (chorus.realtime.capacity.
  ADMISSION_MARGIN, the 15% of N*'s definition) that is N* streams admitted at once on
  a machine whose ceiling gives N*, and the next one waiting in the bounded queue.
- Pacing. A generating stream whose lead (audio generated beyond what its listener has
  played) exceeds `pace_lead_s` sits the step out, its KV kept, whenever another stream
  needs the step: one that is behind, one still waiting for its first audio, a prompt to
  prefill, or a request to admit. Steps then run smaller and faster for those who need
  them. With nobody in need everybody generates, so a lone stream runs as fast as the
  machine allows. Sitting out never changes a stream's tokens: its KV, position and
  random generator are untouched, and llama.cpp's per-sequence KV streams make its
  logits independent of which other sequences share a step.
- Chunked prefill. Prompts of admitted requests fill what the generating tokens leave
  of the `n_batch` budget, oldest admission first, in chunks of at least 2 tokens (a
  1-token chunk takes another kernel and would change the prompt's logits).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Callable

from chorus.realtime.capacity import RealTimeCapacity
from chorus.speech import orpheus
from chorus.speech.family import SpeechFamily
from services.token_server.request import (
    FINISH_REASONS,
    Finished,
    Frame,
    SampledToken,
    Sequence,
    SequenceOutput,
    SequenceStatus,
)


@dataclass
class StepPlan:
    admitted: list[Sequence] = field(default_factory=list)  # took a slot this step (KV to clear)
    decode: list[Sequence] = field(default_factory=list)  # one token each
    prefill: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, tokens to take)
    paced: list[Sequence] = field(default_factory=list)  # generating, sitting this step out

    @property
    def empty(self) -> bool:
        return not (self.decode or self.prefill)


class Scheduler:
    def __init__(
        self,
        slots: int,
        n_batch: int,
        capacity: RealTimeCapacity,
        pace_lead_s: float | None = 2.0,
        codec_streams_limit: Callable[[], int | float] = lambda: float("inf"),
        codec_streams_open: Callable[[], int] = lambda: 0,
        family: SpeechFamily = orpheus.FAMILY,
    ) -> None:
        self.family = family
        self.n_slots = slots
        self.n_batch = n_batch
        self.capacity = capacity
        self.pace_lead_s = pace_lead_s
        # Codec streams this server may hold now (its share of the pool's room).
        self.codec_streams_limit = codec_streams_limit
        # Codec streams this server holds open now. A stream outlives its slot: after
        # the last token its final frames are still being decoded and played, and a
        # codec worker that took new streams then would fall behind on every stream.
        self.codec_streams_open = codec_streams_open
        self.slots: list[Sequence | None] = [None] * slots
        self.waiting: collections.deque[Sequence] = collections.deque()

    # -- membership ------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def remove(self, seq: Sequence, status: SequenceStatus = SequenceStatus.FINISHED_ABORTED) -> bool:
        """Ends a sequence wherever it is, with `status`; True if it held a slot (its KV
        must go)."""
        seq.status = status
        if seq.slot >= 0 and self.slots[seq.slot] is seq:
            self.slots[seq.slot] = None
            seq.slot = -1
            return True
        try:
            self.waiting.remove(seq)
        except ValueError:
            pass
        return False

    @property
    def running(self) -> list[Sequence]:
        return [s for s in self.slots if s is not None]

    def has_work(self) -> bool:
        return any(s is not None for s in self.slots)

    def has_waiting(self) -> bool:
        return bool(self.waiting)

    def admission_limit(self) -> int:
        """Streams that may hold slots now: slots and real-time capacity. Codec room is
        not in it (startable_limit and _can_admit add it, for requests that need it):
        GetStatus reports this as the server's own capacity."""
        return min(self.n_slots, self.capacity.streams())

    def startable_limit(self) -> int:
        """Streams that may hold slots before anyone else ends: admission_limit, and no
        more than those running plus the codec streams still free. The queue bound counts
        from here: counted from admission_limit alone, a server whose codec share was full
        held admission_limit - 1 more requests waiting than its queue allows (issue 22:
        queue depth 34 against a limit of 32). Read from the event loop too: a snapshot."""
        running = self.running
        codec_free = max(0, self.codec_streams_limit() - self._codec_streams_held(running))
        return int(min(self.admission_limit(), len(running) + codec_free))

    def over_queue(self, queue_size: int) -> list[Sequence]:
        """Takes out the newest waiting requests beyond `queue_size` (capacity fell after
        they were accepted) so that the queue bound holds; the caller fails them, and the
        gateway tries them on another token server rather than leaving them here."""
        shed: list[Sequence] = []
        while len(self.waiting) > queue_size:
            shed.append(self.waiting.pop())
            shed[-1].status = SequenceStatus.FINISHED_FAILED
        shed.reverse()
        return shed

    # -- the plan --------------------------------------------------------------

    def schedule(self, now: float) -> StepPlan:
        plan = StepPlan(admitted=self._admit(now))
        running = self.running
        generating = [s for s in running if not s.prefilling]
        prefilling = sorted((s for s in running if s.prefilling), key=lambda s: s.admitted_at or 0.0)
        plan.decode, plan.paced = self._pace(generating, bool(prefilling), now)
        for seq in plan.decode:
            seq.status = SequenceStatus.RUNNING
        for seq in plan.paced:
            seq.status = SequenceStatus.PACED
        budget = self.n_batch - len(plan.decode)
        for seq in prefilling:
            remaining = len(seq.prompt) - seq.prefilled
            take = min(budget, remaining)
            if remaining - take == 1:
                take -= 1  # never leave a 1-token tail
            if take < 2:
                break
            plan.prefill.append((seq, take))
            budget -= take
        return plan

    def _admit(self, now: float) -> list[Sequence]:
        admitted: list[Sequence] = []
        if not self.waiting:
            return admitted
        running = self.running
        with_codec = self._codec_streams_held(running)
        free = [i for i, s in enumerate(self.slots) if s is None]
        while self._can_admit(len(running) + len(admitted), with_codec, len(free)):
            seq = self.waiting.popleft()
            seq.slot = free.pop(0)
            seq.admitted_at = seq.stats.admitted_at = now
            seq.status = SequenceStatus.PREFILLING
            self.slots[seq.slot] = seq
            admitted.append(seq)
            with_codec += seq.needs_codec
        return admitted

    def _can_admit(self, running: int, with_codec: int, free_slots: int) -> bool:
        """Whether the first waiting request may take a slot now: a free slot, real-time
        capacity, and codec room if it needs a codec stream (first come, first served:
        a codes-only request behind it does not overtake). The one predicate admission
        and pacing read: pacing that counted a request codec room kept out made every
        stream ahead sit out for nobody, an empty plan the engine ran again at once."""
        if not self.waiting or not free_slots or running >= self.admission_limit():
            return False
        return not self.waiting[0].needs_codec or with_codec < self.codec_streams_limit()

    def _codec_streams_held(self, running: list[Sequence]) -> int:
        # A running sequence opens its codec stream at its first frame, so the streams
        # held are at least those open and at least those running.
        return max(sum(1 for s in running if s.needs_codec), self.codec_streams_open())

    def _pace(self, generating: list[Sequence], prefilling: bool, now: float) -> tuple[list[Sequence], list[Sequence]]:
        if self.pace_lead_s is None or not generating:
            return generating, []
        ahead = []
        for seq in generating:
            lead = seq.lead(now)
            if lead is not None and lead > self.pace_lead_s:
                ahead.append(seq)
        if not ahead:
            return generating, []
        running = self.running
        admissible = self._can_admit(len(running), self._codec_streams_held(running), self.slots.count(None))
        someone_needs_the_step = len(ahead) < len(generating) or prefilling or admissible
        if not someone_needs_the_step:
            return generating, []
        behind = [s for s in generating if s not in ahead]
        return behind, ahead

    def pace_resume_s(self, paced: list[Sequence], now: float) -> float | None:
        """Seconds until the first of `paced` is back within `pace_lead_s` of its listener
        (a lead falls as its listener plays), when it needs the step again; None if none
        is paced. The engine waits no longer than this on a step with nothing to do."""
        if self.pace_lead_s is None:
            return None
        leads = [lead for lead in (s.lead(now) for s in paced) if lead is not None]
        return max(0.0, min(leads) - self.pace_lead_s) if leads else None

    # -- the outcome -------------------------------------------------------------

    def update_from_output(self, plan: StepPlan, sampled: list[SampledToken]) -> list[SequenceOutput]:
        """Advances the sequences of an executed `plan` by what the engine sampled for
        them (in order), ending those that reached end of speech or their budget: the
        events for their handles, a frame whenever 7 codes complete it, and a final
        Finished. Sequences the engine ended itself (a failed decode or sampling) are
        not in `sampled`."""
        for seq in plan.paced:
            seq.stats.paced_steps += 1
        outputs: list[SequenceOutput] = []
        for token in sampled:
            self._advance(token, outputs)
        return outputs

    def _advance(self, token: SampledToken, outputs: list[SequenceOutput]) -> None:
        seq, position, column, at = token.seq, token.position, token.column, token.at
        stats = seq.stats
        seq.status = SequenceStatus.RUNNING  # the prompt's last chunk samples the first token
        if stats.first_token_at is None:
            stats.first_token_at = at
        family = self.family
        if column == family.eos_column:
            outputs.append(self._finish(seq, SequenceStatus.FINISHED_STOPPED, at))
            return
        seq.sampler.record(position, column)
        seq.last_token = family.code_token_id(column, position)
        seq.generated += 1
        stats.generated_tokens = seq.generated
        seq.frame.append(column)
        if len(seq.frame) < family.codes_per_frame:
            return
        if stats.first_frame_at is None:
            stats.first_frame_at = at
        outputs.append(SequenceOutput(seq, Frame(seq.frames, tuple(seq.frame))))
        seq.frames += 1
        stats.frames = seq.frames
        if seq.frames == family.decoder_lookahead_frames:
            stats.decodable_at = at
        seq.frame = []
        if seq.generated >= seq.token_budget:
            outputs.append(self._finish(seq, SequenceStatus.FINISHED_LENGTH_CAPPED, at))

    def _finish(self, seq: Sequence, status: SequenceStatus, at: float) -> SequenceOutput:
        stats = seq.stats
        stats.finished_at = at
        if stats.decodable_at is None:  # shorter than the lookahead: the end flushes it
            stats.decodable_at = at
        slot = seq.slot
        held = self.remove(seq, status)
        return SequenceOutput(seq, Finished(FINISH_REASONS[status], stats), slot if held else None)
