"""The real-time capacity model with made-up step times."""

from __future__ import annotations

import pytest

from chorus.realtime.capacity import CALIBRATION_ROUNDS, RECOUNT_EVERY, CapacityProbe, RealTimeCapacity, calibrate
from services.token_server.engine import TOKEN_SECONDS

UNIT = 0.010  # each stream needs a step every 10 ms to keep real time


def test_unmeasured_capacity_is_the_limit():
    capacity = RealTimeCapacity(UNIT, limit=8)
    assert capacity.streams() == 8 and capacity.step_seconds(1) is None


def test_capacity_is_the_largest_batch_that_keeps_real_time_with_the_margin():
    capacity = RealTimeCapacity(UNIT, limit=8, margin=0.25)  # budget 8 ms a step
    for size, seconds in {1: 0.004, 2: 0.005, 3: 0.006, 4: 0.0075, 5: 0.0085, 6: 0.0095}.items():
        capacity.record(size, seconds)
    assert capacity.streams() == 4
    assert capacity.step_seconds(4) == pytest.approx(0.0075)  # the fourth stream's step keeps real time


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


# -- issue 22: a busy start must not freeze capacity ----------------------------------


def test_one_slow_size_at_start_is_held_to_what_the_smaller_size_allows():
    """The start that froze a token server at one stream: `1: 3.1 ms, 2: 477.8 ms`.
    Two streams in one step never cost more than two one-stream steps."""
    capacity = RealTimeCapacity(TOKEN_SECONDS, limit=8)
    capacity.record(1, 0.0031)
    capacity.record(2, 0.4778)
    assert capacity.step_seconds(2) == pytest.approx(0.0062)
    assert capacity.streams() > 1


def test_a_larger_batch_is_never_cheaper_than_a_smaller_one():
    capacity = RealTimeCapacity(UNIT, limit=4, margin=0.0)
    capacity.record(2, 0.004)
    capacity.record(1, 0.009)  # one stream measured in a transient: two cost 4 ms, so one costs no more
    assert capacity.step_seconds(1) == pytest.approx(0.004)


def test_calibration_keeps_each_sizes_median_and_remeasures_rounds_that_disagree():
    truth = {1: 0.002, 2: 0.003, 3: 0.004}
    calls: dict[int, int] = {}

    def measure(size: int) -> float:
        calls[size] = calls.get(size, 0) + 1
        # A transient hits size 2's first two rounds (not one outlier: two of three).
        return 0.5 if size == 2 and calls[size] <= 2 else truth[size]

    capacity = RealTimeCapacity(UNIT, limit=3, margin=0.0)
    medians = calibrate(capacity, measure, [1, 2, 3])
    assert calls == {1: CALIBRATION_ROUNDS, 2: CALIBRATION_ROUNDS + 2, 3: CALIBRATION_ROUNDS}
    assert medians == {1: 0.002, 2: 0.003, 3: 0.004}
    assert capacity.streams() == 3


def test_one_outlier_round_does_not_move_a_sizes_median():
    rounds = iter([0.002, 0.9, 0.002, 0.002])
    capacity = RealTimeCapacity(UNIT, limit=1, margin=0.0)
    assert calibrate(capacity, lambda size: next(rounds), [1]) == {1: 0.002}


def test_a_probe_at_the_size_capacity_lost_brings_it_back_without_traffic():
    """Every size calibrated slow (a busy start): capacity 1. No stream runs at two, so
    only re-measuring two (the engine's idle probe) can show the machine is free again;
    what two costs now also bounds every larger size."""
    capacity = RealTimeCapacity(UNIT, limit=8, margin=0.0)
    for size in range(1, 9):
        capacity.record(size, 0.5 * size)
    assert capacity.streams() == 1
    capacity.remeasure(2, 0.004)
    assert capacity.step_seconds(1) == pytest.approx(0.004)
    assert capacity.step_seconds(4) == pytest.approx(0.008)
    assert capacity.streams() == 5  # 10 ms a step holds 5 streams at 2 ms each


def test_a_probe_waits_its_interval_and_backs_off_while_it_gains_nothing():
    now = [0.0]
    capacity = RealTimeCapacity(UNIT, limit=4, margin=0.0)
    for size in range(1, 5):
        capacity.record(size, 0.02 * size)  # every size too slow: capacity 1
    probe = CapacityProbe(capacity, interval_s=5.0, clock=lambda: now[0])
    assert not probe.due()
    now[0] = 5.0
    assert probe.due()
    probe.run(lambda size: 0.03)  # still too slow at two: nothing gained
    assert capacity.streams() == 1 and probe.probes == 1
    now[0] = 14.9
    assert not probe.due()  # the wait doubled to 10 s
    now[0] = 15.0
    probe.run(lambda size: 0.004)  # the machine is free again
    assert capacity.streams() == 4
    assert not probe.due()  # at the limit: nothing left to learn
