"""How many streams a step loop can keep at real time, learned from its own steps.

Both engines advance every stream they serve by a unit of audio per step: the token
engine by one token (12.2 ms of audio, 1/82.03 s), the decode engine by one frame
(85.3 ms). A step over b streams takes t(b) seconds, and the streams keep real time
only while t(b) per unit stays under the unit's duration. So the capacity is the
largest b whose measured step time, with a safety margin, fits: t(b) * (1 + margin) <=
unit. The margin covers what the steady state leaves out: prefill of newly admitted
prompts, the other service's bursts on shared cores, jitter.

t(b) follows the machine as it is loaded (a step measured while the codec worker
decodes beside it is the step that matters). How the sizes compare is a property of
the model and its kernels, learned as each size is first seen; how fast the machine
runs now is one factor, an exponentially weighted mean over every step, that scales
all sizes alike. So a size that stops running (because capacity fell below it) still
follows the machine: when the cores are free again, its estimate falls with the sizes
that do run, and capacity comes back. Sizes never seen are estimated from those seen:
a straight line through them (a step's cost is a fixed part, reading the weights, plus
a part per stream), never below the dearest smaller size. Engines calibrate every size
at start, so admission does not have to guess before traffic arrives.

The margin ties admission to N*, the streams a machine should hold: the largest C whose
ceiling (audio seconds per wall second at batch C, the slower of backbone and decoder,
as `chorus bench --ceiling` measures it) is at least 1.15 C. A step loop's ceiling at
batch b is b * unit / t(b), so ceiling(b) >= 1.15 b is exactly t(b) * 1.15 <= unit:
this model's test at ADMISSION_MARGIN (0.15). Step times only grow with the batch, so
both services at that margin admit min(backbone's, decoder's) = N* streams at once, and
the next one waits or is refused. A wider margin on either side (the codec worker had
0.3) admits fewer than N* wherever the ceiling's headroom at N* is between 15% and it;
the 15% is already the room for what the bare loops leave out (sampling, relays, the
gateway, scheduling). Starting streams need no extra margin: the schedulers give them
what their lead needs (the token scheduler's pacing, the decode engine's urgency and
frame bound).

A transient only ever makes a step slower (another process starting beside this one,
page-cache misses, spinning thread pools), never faster, so measurements are kept
consistent with two bounds that hold for a batched step and trust the faster side
when they contradict each other: a step over more streams is never cheaper than one
over fewer (t(a) <= t(b) for a < b), and never dearer than running them in proportion
(t(b) <= t(a) * b / a: a batch at worst gains nothing). A start that measured
`1: 3.1 ms, 2: 477.8 ms` (issue 22) therefore keeps at most 6.2 ms for two streams.
`calibrate` measures every size in interleaved rounds and keeps each size's median, so
that one transient hits one round of a size rather than all of it. And since a size
that stopped running is seen only through the shared factor, an engine idle below its
limit probes the next size up now and then (`CapacityProbe`, through `remeasure`):
capacity lost to a transient comes back without traffic at the size it lost.
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
import time
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)

# N* is the largest C whose ceiling(C) is at least NSTAR_HEADROOM * C; capacity at
# ADMISSION_MARGIN is that same test per step loop (the module's docstring says why), so
# both services at this margin admit exactly N*.
NSTAR_HEADROOM = 1.15
ADMISSION_MARGIN = 0.15
RECOUNT_EVERY = 32
# Rounds `calibrate` measures every size in; the median of three survives one outlier.
CALIBRATION_ROUNDS = 3
# A size whose median is over this factor above its fastest round (transients hit most
# of its rounds) is measured again, at most EXTRA_ROUNDS more times.
ROUNDS_DISAGREE = 2.0
EXTRA_ROUNDS = 2
# An idle engine below its limit re-measures the next size up this often (seconds),
# doubling up to PROBE_MAX_INTERVAL_S while probes gain nothing.
PROBE_INTERVAL_S = 5.0
PROBE_MAX_INTERVAL_S = 60.0


class RealTimeCapacity:
    def __init__(
        self, unit_seconds: float, limit: int, margin: float = ADMISSION_MARGIN, smoothing: float = 0.1,
        enforce: bool = True,
    ) -> None:
        if unit_seconds <= 0:
            raise ValueError(f"unit_seconds must be positive, got {unit_seconds}")
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        if not 0.0 <= margin <= 10.0:
            raise ValueError(f"margin must be in [0, 10], got {margin}")
        self.unit_seconds = unit_seconds
        self.limit = limit
        self.margin = margin
        self._smoothing = smoothing
        self._step_seconds: dict[int, float] = {}  # batch size -> seconds per unit, smoothed
        self._lock = threading.Lock()
        # False: measure and report, but `streams` stays at `limit` (admission by slots only).
        self.enforce = enforce
        self._streams = limit  # cached answer, recounted as steps are recorded
        self._records = 0

    def record(self, streams: int, seconds: float, units: int = 1) -> None:
        """A step advanced `streams` streams by `units` units each in `seconds`."""
        if streams < 1 or units < 1 or not math.isfinite(seconds) or seconds <= 0:
            return
        per_unit = seconds / units
        with self._lock:
            previous = self._step_seconds.get(streams)
            if previous is None:
                self._step_seconds[streams] = per_unit
                self._make_consistent()
            else:
                # The exponentially weighted step, as a factor on every size.
                factor = 1.0 + self._smoothing * (per_unit / previous - 1.0)
                for size in self._step_seconds:
                    self._step_seconds[size] *= factor
            # Recounting walks every size: on every new size, else every few steps (the
            # engines record hundreds of steps a second; the answer moves slowly).
            self._records += 1
            if previous is None or self._records % RECOUNT_EVERY == 0:
                self._streams = self._compute()

    def remeasure(self, streams: int, seconds: float, units: int = 1) -> None:
        """A fresh measurement of one size (calibration, an idle probe): it replaces that
        size's estimate, rather than nudging the factor every size shares, so that a size
        measured wrong once (or while the machine was busy) can be measured right again.
        The bounds still hold it to what the other sizes allow, so a fresh measurement
        raises capacity but never lowers it below them: slowing down is the live steps'
        factor's job, which sees the machine as it serves."""
        if streams < 1 or units < 1 or not math.isfinite(seconds) or seconds <= 0:
            return
        with self._lock:
            self._step_seconds[streams] = seconds / units
            self._make_consistent()
            self._streams = self._compute()

    def step_seconds(self, streams: int) -> float | None:
        """Seconds a step over `streams` streams takes per unit: measured, or estimated."""
        with self._lock:
            return self._estimate(streams)

    def streams(self) -> int:
        """Streams that may run: those held at real time with the margin (at least 1;
        `limit` before any step or when not enforced)."""
        return self._streams if self.enforce else self.limit

    def estimated_streams(self) -> int:
        """Streams held at real time with the margin, enforced or not."""
        return self._streams

    def _make_consistent(self) -> None:
        """Lowers every size to the tightest bound another size's measurement sets
        (t(a) <= t(b) for a < b; t(b) <= t(a) * b / a). The bounds compose, so one pass
        over the original values reaches the fixed point. Uniform scaling by the factor
        keeps the table consistent, so only a new or re-measured size calls this."""
        table = dict(self._step_seconds)
        for size, seconds in table.items():
            bound = min((t * size / s if s < size else t for s, t in table.items() if s != size), default=seconds)
            self._step_seconds[size] = min(seconds, bound)

    def _compute(self) -> int:
        budget = self.unit_seconds / (1.0 + self.margin)
        held = 1
        for b in range(1, self.limit + 1):
            estimate = self._estimate(b)
            if estimate is None or estimate > budget:
                break
            held = b
        return held

    def _estimate(self, b: int) -> float | None:
        if b in self._step_seconds:
            return self._step_seconds[b]
        if not self._step_seconds:
            return None
        sizes = sorted(self._step_seconds)
        floor = max((self._step_seconds[s] for s in sizes if s < b), default=0.0)
        if len(sizes) == 1:
            # One size seen: assume no batching gain beyond it (safe), full gain below.
            (seen,) = sizes
            value = self._step_seconds[seen] * max(1.0, b / seen)
        else:
            n = len(sizes)
            mean_x = sum(sizes) / n
            mean_y = sum(self._step_seconds[s] for s in sizes) / n
            var = sum((s - mean_x) ** 2 for s in sizes)
            slope = sum((s - mean_x) * (self._step_seconds[s] - mean_y) for s in sizes) / var
            value = mean_y + max(0.0, slope) * (b - mean_x)
        return max(value, floor)


def calibration_summary(measured: dict[int, float] | None, capacity: RealTimeCapacity) -> str:
    """The start-up line of a service's capacity: what calibration measured, or that it
    was skipped (`measured` None: --no-calibrate) and capacity starts at the limit."""
    if measured is None:
        return (f"calibration skipped (--no-calibrate): real-time capacity starts at {capacity.streams()} streams "
                "and is learned from live steps")
    steps = ", ".join(f"{size}: {seconds * 1000:.1f} ms" for size, seconds in measured.items())
    return f"step seconds by batch size: {steps}; real-time capacity {capacity.streams()} streams"


def calibrate(
    capacity: RealTimeCapacity, measure: Callable[[int], float], sizes: Iterable[int], rounds: int = CALIBRATION_ROUNDS
) -> dict[int, float]:
    """Measures every size in `rounds` interleaved rounds (`measure(size)`: seconds per
    step, already a median over a few steps) and keeps each size's median across them.

    Interleaved, so that a transient (a neighbour process loading its model, compiling
    its kernels, spinning its thread pool) hits one round of every size rather than every
    round of one size; a size whose median is still ROUNDS_DISAGREE above its fastest round
    is measured again. The result goes in as fresh measurements (`remeasure`), where the
    bounds between sizes catch what the medians let through. Returns the medians."""
    sizes = list(sizes)
    samples: dict[int, list[float]] = {size: [] for size in sizes}
    for _ in range(rounds):
        for size in sizes:
            samples[size].append(measure(size))
    for size in sizes:
        for _ in range(EXTRA_ROUNDS):
            if statistics.median(samples[size]) <= ROUNDS_DISAGREE * min(samples[size]):
                break
            samples[size].append(measure(size))
    medians = {size: statistics.median(samples[size]) for size in sizes}
    for size, seconds in medians.items():
        capacity.remeasure(size, seconds)
    return medians


class CapacityProbe:
    """When an idle engine re-measures the size just above its capacity, and what it learns.

    Live steps run only at sizes capacity admits, so a size lost to a transient (a busy
    start, a neighbour's burst) is otherwise seen only through the factor all sizes
    share, and stays lost if it was measured wrong (issue 22: a token server held one
    stream for good after a busy start). A probe's measurement replaces that size's
    estimate and, through the bounds between sizes, every larger one's. A probe that
    gains nothing waits twice as long for the next, up to PROBE_MAX_INTERVAL_S, so a
    machine that really is this busy pays little for being asked. Engine thread only."""

    def __init__(
        self,
        capacity: RealTimeCapacity,
        interval_s: float | None = PROBE_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        name: str = "engine",
    ) -> None:
        self.capacity = capacity
        self.interval_s = interval_s  # None: never probe
        self._clock = clock
        self._name = name
        self._wait_s = interval_s or 0.0
        self._next_at = clock() + self._wait_s
        self.probes = 0

    def restart(self) -> None:
        """A fresh calibration: the next probe one interval from now."""
        self._wait_s = self.interval_s or 0.0
        self._next_at = self._clock() + self._wait_s

    def due(self) -> bool:
        """A probe would tell something now (the caller checks that its engine is idle)."""
        return (
            self.interval_s is not None
            and self.capacity.enforce
            and self.capacity.estimated_streams() < self.capacity.limit
            and self._clock() >= self._next_at
        )

    def run(self, measure: Callable[[int], float]) -> None:
        """Measures the size above capacity with `measure(size)` (seconds per step)."""
        before = self.capacity.estimated_streams()
        size = before + 1
        self.capacity.remeasure(size, measure(size))
        self.probes += 1
        after = self.capacity.estimated_streams()
        if after > before:
            log.info("%s: capacity probe at %d streams: real-time capacity %d -> %d streams",
                     self._name, size, before, after)
            self._wait_s = self.interval_s
        else:
            self._wait_s = min(2 * self._wait_s, max(PROBE_MAX_INTERVAL_S, self.interval_s))
        self._next_at = self._clock() + self._wait_s
