"""The real-time capacity model with made-up step times."""

from __future__ import annotations

import pytest

from chorus.capacity import RECOUNT_EVERY, RealTimeCapacity

UNIT = 0.010  # each stream needs a step every 10 ms to keep real time


def test_unmeasured_capacity_is_the_limit():
    capacity = RealTimeCapacity(UNIT, limit=8)
    assert capacity.streams() == 8 and not capacity.measured


def test_capacity_is_the_largest_batch_that_keeps_real_time_with_the_margin():
    capacity = RealTimeCapacity(UNIT, limit=8, margin=0.25)  # budget 8 ms a step
    for size, seconds in {1: 0.004, 2: 0.005, 3: 0.006, 4: 0.0075, 5: 0.0085, 6: 0.0095}.items():
        capacity.record(size, seconds)
    assert capacity.streams() == 4
    assert capacity.per_stream_speed(4) == pytest.approx(UNIT / 0.0075)


def test_without_margin_the_same_machine_holds_more():
    capacity = RealTimeCapacity(UNIT, limit=8, margin=0.0)
    for size, seconds in {1: 0.004, 2: 0.005, 3: 0.006, 4: 0.0075, 5: 0.0085, 6: 0.0095, 7: 0.0105}.items():
        capacity.record(size, seconds)
    assert capacity.streams() == 6


def test_unseen_sizes_follow_the_line_through_the_seen_ones():
    capacity = RealTimeCapacity(0.0095, limit=16, margin=0.0)
    capacity.record(1, 0.002)
    capacity.record(2, 0.003)  # a fixed 1 ms and 1 ms per stream
    assert capacity.step_seconds(8) == pytest.approx(0.009)
    assert capacity.streams() == 8


def test_one_size_seen_assumes_no_batching_gain_beyond_it():
    capacity = RealTimeCapacity(UNIT, limit=8, margin=0.0)
    capacity.record(2, 0.004)
    assert capacity.step_seconds(4) == pytest.approx(0.008)
    assert capacity.streams() == 5


def test_slow_steps_lower_capacity_as_they_come_and_never_below_one():
    capacity = RealTimeCapacity(UNIT, limit=4, margin=0.0, smoothing=1.0)
    capacity.record(1, 0.003)
    capacity.record(2, 0.004)
    assert capacity.streams() == 4
    for _ in range(RECOUNT_EVERY):
        capacity.record(2, 0.030)  # the machine got busy
    assert capacity.streams() == 1
    for _ in range(RECOUNT_EVERY):
        capacity.record(1, 0.050)
    assert capacity.streams() == 1  # one stream is always admitted


def test_capacity_comes_back_when_the_machine_is_free_again_though_bigger_batches_stopped():
    """Capacity fell to one stream while the cores were shared; the steps since then
    are all of one stream. Those alone must bring the larger sizes back down, or the
    server stays at one stream for good."""
    capacity = RealTimeCapacity(UNIT, limit=4, margin=0.0, smoothing=1.0)
    capacity.record(1, 0.003)
    capacity.record(2, 0.004)
    for _ in range(RECOUNT_EVERY):
        capacity.record(2, 0.030)  # busy: every size is 7.5 times dearer
    assert capacity.streams() == 1
    assert capacity.step_seconds(1) == pytest.approx(0.0225)
    for _ in range(RECOUNT_EVERY):
        capacity.record(1, 0.003)  # free again, seen through one-stream steps only
    assert capacity.step_seconds(2) == pytest.approx(0.004)
    assert capacity.streams() == 4


def test_multi_unit_steps_count_per_unit_and_junk_is_ignored():
    capacity = RealTimeCapacity(UNIT, limit=4, margin=0.0, smoothing=1.0)
    capacity.record(1, 0.012, units=3)
    assert capacity.step_seconds(1) == pytest.approx(0.004)
    for junk in (float("nan"), -1.0, 0.0, float("inf")):
        capacity.record(1, junk)
    assert capacity.step_seconds(1) == pytest.approx(0.004)


def test_not_enforced_reports_but_admits_the_limit():
    capacity = RealTimeCapacity(UNIT, limit=6, margin=0.0, enforce=False)
    capacity.record(1, 0.02)
    assert capacity.streams() == 6 and capacity.estimated_streams() == 1
