"""The token engine's scheduler with fake clocks and fake step times: admission by
real-time capacity, pacing, chunked prefill. No llama.cpp here."""

from __future__ import annotations

import numpy as np
import pytest

from chorus.realtime.capacity import RealTimeCapacity
from chorus.realtime.playback import PlaybackClock
from chorus.speech import orpheus
from services.token_server.engine import TOKEN_SECONDS
from services.token_server.request import Finished, Frame, SampledToken, Sequence, SequenceStatus
from services.token_server.sampler import EOS_COLUMN, SamplingParams, SequenceSampler
from services.token_server.scheduler import Scheduler

NOW = 1000.0


def capacity_of(streams_held: int, slots: int = 8) -> RealTimeCapacity:
    """A capacity model that measured steps fast enough for exactly `streams_held` streams."""
    capacity = RealTimeCapacity(TOKEN_SECONDS, slots, margin=0.0, smoothing=1.0)
    for size in range(1, slots + 1):
        # Under the budget up to streams_held, over it beyond; in proportion to the size,
        # as a real step may be (chorus.realtime.capacity bounds a batch by its smaller sizes).
        capacity.record(size, TOKEN_SECONDS * size / (streams_held + 0.5))
    assert capacity.streams() == streams_held
    return capacity


def sequence(name: str, prompt_tokens: int = 10, clock: PlaybackClock | None = None, generating: bool = False,
             frames: int = 0, needs_codec: bool = True) -> Sequence:
    seq = Sequence(
        request_id=name,
        prompt=np.arange(prompt_tokens, dtype=np.int32),
        sampler=SequenceSampler(SamplingParams(seed=0)),
        token_budget=700,
        ignore_end_of_speech=False,
        clock=clock or PlaybackClock(orpheus.SAMPLE_RATE),
        submitted_at=NOW,
        needs_codec=needs_codec,
    )
    if generating:
        seq.prefilled = prompt_tokens
        seq.frames = frames
    return seq


def ahead_by(seconds: float) -> PlaybackClock:
    """A clock whose first sample is due in `seconds` (its listener is that far from needing audio)."""
    return PlaybackClock.scheduled(orpheus.SAMPLE_RATE, NOW + seconds)


def place(scheduler: Scheduler, *seqs: Sequence) -> None:
    for seq in seqs:
        seq.slot = scheduler.slots.index(None)
        seq.admitted_at = NOW
        scheduler.slots[seq.slot] = seq


def test_admission_stops_at_real_time_capacity_and_resumes_when_a_stream_ends():
    scheduler = Scheduler(slots=8, n_batch=512, capacity=capacity_of(2))
    seqs = [sequence(f"r{i}") for i in range(4)]
    for seq in seqs:
        scheduler.add(seq)
    plan = scheduler.schedule(NOW)
    assert plan.admitted == seqs[:2]
    assert list(scheduler.waiting) == seqs[2:]
    assert scheduler.schedule(NOW + 1).admitted == []  # still full: nobody overtakes, nobody joins
    assert scheduler.remove(seqs[0])  # a stream ends, its slot frees
    assert scheduler.schedule(NOW + 2).admitted == [seqs[2]]
    assert list(scheduler.waiting) == [seqs[3]]


def test_a_full_codec_pool_holds_audio_requests_back_and_codes_only_ones_wait_their_turn():
    limit = [1]
    scheduler = Scheduler(slots=8, n_batch=512, capacity=capacity_of(8), codec_streams_limit=lambda: limit[0])
    audio = [sequence("a0"), sequence("a1")]
    codes = sequence("c0", needs_codec=False)
    for seq in (*audio, codes):
        scheduler.add(seq)
    assert scheduler.schedule(NOW).admitted == [audio[0]]
    assert list(scheduler.waiting) == [audio[1], codes]  # first come, first served
    limit[0] = 2  # a codec worker reported room
    assert scheduler.schedule(NOW).admitted == [audio[1], codes]


def test_codec_streams_still_decoding_after_their_slot_ended_count_against_the_pool():
    """A generation that ended leaves its slot, but its last frames are still being
    decoded: admitting into its codec seat overloaded the worker and every stream fell
    behind."""
    still_open = [2]
    scheduler = Scheduler(slots=8, n_batch=512, capacity=capacity_of(8), codec_streams_limit=lambda: 2,
                          codec_streams_open=lambda: still_open[0])
    waiting = sequence("w")
    scheduler.add(waiting)
    assert scheduler.schedule(NOW).admitted == []  # no slot is busy, yet both codec seats are
    still_open[0] = 1  # one of them finished playing out
    assert scheduler.schedule(NOW).admitted == [waiting]


def test_streams_far_ahead_sit_out_while_others_need_the_step():
    scheduler = Scheduler(slots=8, n_batch=512, capacity=capacity_of(8), pace_lead_s=2.0)
    far = sequence("far", clock=ahead_by(5.0), generating=True)
    close = sequence("close", clock=ahead_by(0.5), generating=True)
    new = sequence("new", generating=True)  # no audio yet: its clock has not started
    place(scheduler, far, close, new)
    plan = scheduler.schedule(NOW)
    assert plan.paced == [far]
    assert plan.decode == [close, new]


def test_a_stream_alone_is_never_paced():
    scheduler = Scheduler(slots=8, n_batch=512, capacity=capacity_of(8), pace_lead_s=2.0)
    far = sequence("far", clock=ahead_by(5.0), generating=True)
    other = sequence("other", clock=ahead_by(9.0), generating=True)
    place(scheduler, far, other)
    plan = scheduler.schedule(NOW)  # everyone is ahead: nobody needs the step more
    assert plan.paced == [] and plan.decode == [far, other]


def test_a_prompt_to_prefill_or_a_request_to_admit_makes_the_ahead_stream_wait():
    scheduler = Scheduler(slots=8, n_batch=512, capacity=capacity_of(8), pace_lead_s=2.0)
    far = sequence("far", clock=ahead_by(5.0), generating=True)
    place(scheduler, far)
    scheduler.add(sequence("arriving", prompt_tokens=30))
    plan = scheduler.schedule(NOW)
    assert [s.request_id for s in plan.admitted] == ["arriving"]
    assert plan.paced == [far] and plan.decode == []
    assert [(s.request_id, n) for s, n in plan.prefill] == [("arriving", 30)]


def test_lead_counts_frames_generated_not_only_audio_delivered():
    # Due in 1 s, but 30 frames (2.56 s) already generated: 3.56 s ahead.
    ahead = sequence("ahead", clock=ahead_by(1.0), generating=True, frames=30)
    assert ahead.lead(NOW) == pytest.approx(1.0 + 30 * orpheus.FRAME_SECONDS)
    behind = sequence("behind", clock=ahead_by(1.0), generating=True)
    scheduler = Scheduler(slots=8, n_batch=512, capacity=capacity_of(8), pace_lead_s=2.0)
    place(scheduler, ahead, behind)
    assert scheduler.schedule(NOW).paced == [ahead]


def test_no_pacing_when_switched_off():
    scheduler = Scheduler(slots=8, n_batch=512, capacity=capacity_of(8), pace_lead_s=None)
    far = sequence("far", clock=ahead_by(50.0), generating=True)
    new = sequence("new", generating=True)
    place(scheduler, far, new)
    assert scheduler.schedule(NOW).paced == []


def test_prefill_fills_what_generation_leaves_of_the_batch_in_chunks_of_two_or_more():
    scheduler = Scheduler(slots=8, n_batch=16, capacity=capacity_of(8), pace_lead_s=None)
    generating = [sequence(f"g{i}", generating=True) for i in range(3)]
    first = sequence("first", prompt_tokens=12)
    second = sequence("second", prompt_tokens=6)
    place(scheduler, *generating, first, second)
    plan = scheduler.schedule(NOW)
    assert len(plan.decode) == 3
    # 13 tokens left: all 12 of the first prompt, then nothing (a 1-token chunk is never taken).
    assert [(s.request_id, n) for s, n in plan.prefill] == [("first", 12)]
    first.prefilled = 12
    plan = scheduler.schedule(NOW)
    # The first prompt is done: 16 - 4 generating leaves room for all of the second.
    assert [(s.request_id, n) for s, n in plan.prefill] == [("second", 6)]


def test_prefill_never_leaves_a_one_token_tail():
    scheduler = Scheduler(slots=8, n_batch=10, capacity=capacity_of(8), pace_lead_s=None)
    prompt = sequence("p", prompt_tokens=11)
    place(scheduler, prompt)
    plan = scheduler.schedule(NOW)
    assert [(s.request_id, n) for s, n in plan.prefill] == [("p", 9)]  # 10 would leave 1


def test_codec_room_bounds_what_may_start_and_over_queue_sheds_the_newest():
    """The queue bound counts from the streams that can start now: with the codec share
    full only the running stream holds a place (issue 22: depth 34 against 32)."""
    limit = [1]
    scheduler = Scheduler(slots=8, n_batch=512, capacity=capacity_of(4), codec_streams_limit=lambda: limit[0])
    assert scheduler.startable_limit() == 1
    seqs = [sequence(f"r{i}") for i in range(5)]
    for seq in seqs:
        scheduler.add(seq)
    assert scheduler.schedule(NOW).admitted == [seqs[0]]
    assert scheduler.startable_limit() == 1
    limit[0] = 8
    assert scheduler.startable_limit() == 4  # real-time capacity again
    assert scheduler.over_queue(2) == seqs[3:]
    assert list(scheduler.waiting) == seqs[1:3]
    assert scheduler.over_queue(2) == []


def test_a_request_codec_room_keeps_out_does_not_make_streams_ahead_sit_out():
    """Admission and pacing read one predicate: a waiting request the full codec pool
    keeps out cannot use the step, so the stream ahead keeps generating. Paced for it,
    the plan was empty and the engine thread ran empty steps at a core's full speed."""
    scheduler = Scheduler(slots=8, n_batch=512, capacity=capacity_of(8), pace_lead_s=2.0,
                          codec_streams_limit=lambda: 1)
    far = sequence("far", clock=ahead_by(5.0), generating=True)
    place(scheduler, far)
    scheduler.add(sequence("waiting"))
    plan = scheduler.schedule(NOW)
    assert plan.admitted == [] and plan.paced == []
    assert plan.decode == [far] and not plan.empty


def test_pace_resume_is_when_the_least_ahead_paced_stream_needs_the_step_again():
    scheduler = Scheduler(slots=8, n_batch=512, capacity=capacity_of(8), pace_lead_s=2.0)
    far = sequence("far", clock=ahead_by(5.0), generating=True)
    farther = sequence("farther", clock=ahead_by(9.0), generating=True)
    assert scheduler.pace_resume_s([farther, far], NOW) == pytest.approx(3.0)
    assert scheduler.pace_resume_s([far], NOW + 4.0) == 0.0
    assert scheduler.pace_resume_s([], NOW) is None


def picked(seq: Sequence, column: int, at: float = NOW) -> SampledToken:
    """What the engine would hand back for `seq` after sampling `column`."""
    return SampledToken(seq, seq.generated % orpheus.CODES_PER_FRAME, column, at)


def test_a_sequence_status_follows_it_from_waiting_through_prefill_generation_and_pacing_to_its_budget():
    scheduler = Scheduler(slots=3, n_batch=8, capacity=capacity_of(3))
    seq = sequence("walk", prompt_tokens=10)
    seq.token_budget = 2 * orpheus.CODES_PER_FRAME
    scheduler.add(seq)
    assert seq.status is SequenceStatus.WAITING

    plan = scheduler.schedule(NOW)  # admitted, its prompt in chunks of the batch
    assert plan.admitted == [seq] and plan.prefill == [(seq, 8)]
    assert seq.status is SequenceStatus.PREFILLING and seq.stats.admitted_at == NOW
    seq.prefilled += 8
    assert scheduler.update_from_output(plan, []) == []
    assert seq.status is SequenceStatus.PREFILLING

    plan = scheduler.schedule(NOW + 0.1)
    assert plan.prefill == [(seq, 2)]
    seq.prefilled += 2  # the prompt's last chunk samples the first token
    assert scheduler.update_from_output(plan, [picked(seq, 5, NOW + 0.2)]) == []
    assert seq.status is SequenceStatus.RUNNING
    assert seq.stats.first_token_at == NOW + 0.2
    assert seq.last_token == orpheus.audio_token_id(5, 0)

    outputs = []
    for code in range(6):  # the rest of the first frame
        plan = scheduler.schedule(NOW + 0.3)
        assert plan.decode == [seq] and seq.status is SequenceStatus.RUNNING
        outputs += scheduler.update_from_output(plan, [picked(seq, code, NOW + 0.3)])
    assert [o.event for o in outputs] == [Frame(0, (5, 0, 1, 2, 3, 4, 5))]
    assert seq.stats.first_frame_at == NOW + 0.3 and seq.stats.frames == 1

    # Far ahead of its listener while another stream needs the step: it sits out.
    behind = sequence("behind", generating=True)
    place(scheduler, behind)
    seq.clock = ahead_by(5.0)  # the engine's copy, replaced as the event loop hands it over
    plan = scheduler.schedule(NOW)
    assert plan.paced == [seq] and plan.decode == [behind]
    assert seq.status is SequenceStatus.PACED and behind.status is SequenceStatus.RUNNING
    scheduler.update_from_output(plan, [picked(behind, 0)])
    assert seq.stats.paced_steps == 1 and behind.stats.paced_steps == 0

    seq.clock = ahead_by(0.5)  # its listener caught up
    slot = seq.slot
    outputs = []
    for code in range(7):
        plan = scheduler.schedule(NOW)
        assert seq in plan.decode and seq.status is SequenceStatus.RUNNING
        outputs += scheduler.update_from_output(plan, [picked(seq, code, NOW + 1.0)])
    assert [type(o.event) for o in outputs] == [Frame, Finished]
    assert outputs[1].event.reason == "max_tokens" and outputs[1].freed_slot == slot
    assert seq.status is SequenceStatus.FINISHED_LENGTH_CAPPED and seq.status.finished
    assert seq.stats.finished_at == NOW + 1.0 and scheduler.slots[slot] is None


def test_every_way_a_sequence_ends_sets_its_finished_status():
    scheduler = Scheduler(slots=2, n_batch=64, capacity=capacity_of(2))
    speaking, cancelled, queued, shed = (sequence(name) for name in ("speaking", "cancelled", "queued", "shed"))
    for seq in (speaking, cancelled, queued, shed):
        scheduler.add(seq)
    plan = scheduler.schedule(NOW)
    assert plan.admitted == [speaking, cancelled]
    assert [s.status for s in (queued, shed)] == [SequenceStatus.WAITING] * 2

    # End of speech is legal only at a frame boundary: after one whole frame.
    speaking.prefilled = len(speaking.prompt)
    outputs = scheduler.update_from_output(plan, [picked(speaking, code) for code in range(7)])
    assert speaking.status is SequenceStatus.RUNNING and [type(o.event) for o in outputs] == [Frame]
    slot = speaking.slot
    outputs = scheduler.update_from_output(plan, [picked(speaking, EOS_COLUMN, NOW + 2)])
    assert [(o.event.reason, o.freed_slot) for o in outputs] == [("end_of_speech", slot)]
    assert speaking.status is SequenceStatus.FINISHED_STOPPED and speaking.stats.generated_tokens == 7

    assert scheduler.remove(cancelled)  # the caller cancelled it in its slot
    assert cancelled.status is SequenceStatus.FINISHED_ABORTED
    assert scheduler.over_queue(1) == [shed]  # capacity fell: the newest waiting one goes
    assert shed.status is SequenceStatus.FINISHED_FAILED
    assert not scheduler.remove(queued, SequenceStatus.FINISHED_FAILED)  # a failure while it waited
    assert queued.status is SequenceStatus.FINISHED_FAILED and not scheduler.has_waiting()
