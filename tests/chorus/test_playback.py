"""The listener's playback clock, with hand-made times: start buffer, underruns, lead."""

from __future__ import annotations

import pytest

from chorus.proto.tts.v1 import common_pb2
from chorus.realtime.playback import DEFAULT_START_BUFFER_S, PlaybackClock, urgency

RATE = 1000  # samples a second: one sample is a millisecond


def test_playback_starts_a_start_buffer_after_the_first_audio():
    clock = PlaybackClock(RATE, start_buffer_s=0.15)
    assert not clock.started and clock.lead(0.0) is None and clock.due_in(0, 0.0) is None
    assert clock.deliver(100, now=10.0) is None  # 0.1 s of audio at t=10
    assert clock.start_at == pytest.approx(10.15)
    assert clock.lead(10.1) == pytest.approx(0.15)  # the rest of the buffer, then 0.1 s of audio
    assert clock.lead(10.2) == pytest.approx(0.05)  # playing: delivered minus played
    assert clock.due_in(100, 10.2) == pytest.approx(0.05)


def test_audio_just_in_time_is_not_an_underrun_and_late_audio_is_one():
    clock = PlaybackClock(RATE, start_buffer_s=0.1)
    clock.deliver(100, now=0.0)  # plays from 0.1 to 0.2
    assert clock.deliver(100, now=0.2) is None  # due at 0.2 exactly
    stall = clock.deliver(100, now=0.5)  # due at 0.3: the listener waited 0.2 s
    assert stall is not None and stall.due_at == pytest.approx(0.3) and stall.seconds == pytest.approx(0.2)
    assert clock.underruns == 1 and clock.stall_seconds == pytest.approx(0.2)
    # The player resumed at 0.5, so the schedule moved by the stall: the next 100 are due at 0.6.
    assert clock.deliver(100, now=0.6) is None
    assert clock.deliver(50, now=0.75) is not None
    assert clock.underruns == 2 and clock.stall_seconds == pytest.approx(0.25)


def test_a_scheduled_clock_is_running_from_its_first_sample():
    # A resumed stream: sample 500 is due at t=3.0; the 500 before it count as delivered.
    clock = PlaybackClock.scheduled(RATE, first_sample_due_at=3.0, first_sample=500)
    assert clock.started and clock.delivered == 500
    assert clock.due_in(500, now=2.0) == pytest.approx(1.0)
    assert clock.lead(2.0) == pytest.approx(1.0)  # nothing more is needed for a second
    assert clock.deliver(100, now=3.2) is not None  # 0.2 s late


def test_lead_of_audio_generated_but_not_yet_delivered():
    clock = PlaybackClock(RATE, start_buffer_s=0.0)
    clock.deliver(1000, now=0.0)
    assert clock.lead(0.5) == pytest.approx(0.5)
    assert clock.lead(0.5, delivered=3000) == pytest.approx(2.5)
    assert clock.lead(2.0) == pytest.approx(-1.0)  # starved: negative lead is how late


def test_urgency_orders_streams_without_audio_first_then_least_lead():
    leads = {"ahead": 3.0, "new": None, "late": -0.5, "close": 0.1}
    assert sorted(leads, key=lambda k: urgency(leads[k])) == ["new", "late", "close", "ahead"]


@pytest.mark.parametrize("bad", [dict(sample_rate=0), dict(start_buffer_s=-1.0), dict(start_buffer_s=1e9)])
def test_bad_clock_settings_are_refused(bad):
    with pytest.raises(ValueError):
        PlaybackClock(**{"sample_rate": RATE, **bad})


def test_from_wire_without_a_schedule_starts_at_the_first_audio():
    clock = PlaybackClock.from_wire(common_pb2.PlaybackClock(), RATE, now=100.0)
    assert not clock.started
    assert clock.start_buffer_s == DEFAULT_START_BUFFER_S  # 0 on the wire: the default
    clock = PlaybackClock.from_wire(common_pb2.PlaybackClock(start_buffer_s=0.5), RATE, now=100.0)
    clock.deliver(10, 200.0)
    assert clock.due_at(0) == pytest.approx(200.5)


def test_from_wire_with_a_schedule_runs_on_this_hops_clock_from_first_sample():
    wire = common_pb2.PlaybackClock(start_buffer_s=0.2, first_sample_due_in_s=-1.5)
    clock = PlaybackClock.from_wire(wire, RATE, now=100.0, first_sample=3000)
    assert clock.started and clock.delivered == 3000
    assert clock.due_at(3000) == pytest.approx(98.5)  # already 1.5 s late: a replay behind its listener
    assert clock.due_at(0) == pytest.approx(95.5)
    assert clock.start_buffer_s == 0.2


@pytest.mark.parametrize("wire, field", [
    (common_pb2.PlaybackClock(start_buffer_s=61.0), "playback.start_buffer_s is 61"),
    (common_pb2.PlaybackClock(start_buffer_s=-0.5), "playback.start_buffer_s is -0.5"),
    (common_pb2.PlaybackClock(first_sample_due_in_s=3601.0), "playback.first_sample_due_in_s is 3601"),
    (common_pb2.PlaybackClock(first_sample_due_in_s=-4000.0), "playback.first_sample_due_in_s is -4000"),
])
def test_from_wire_refuses_a_schedule_out_of_range_naming_the_field(wire, field):
    with pytest.raises(ValueError, match=field):
        PlaybackClock.from_wire(wire, RATE, now=100.0)
