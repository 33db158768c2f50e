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
once at start, so admission does not have to guess before traffic arrives.
"""

from __future__ import annotations

import math
import threading

RECOUNT_EVERY = 32


class RealTimeCapacity:
    def __init__(
        self, unit_seconds: float, limit: int, margin: float = 0.15, smoothing: float = 0.1, enforce: bool = True
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

    def step_seconds(self, streams: int) -> float | None:
        """Seconds a step over `streams` streams takes per unit: measured, or estimated."""
        with self._lock:
            return self._estimate(streams)

    @property
    def measured(self) -> bool:
        return bool(self._step_seconds)

    def streams(self) -> int:
        """Streams that may run: those held at real time with the margin (at least 1;
        `limit` before any step or when not enforced)."""
        return self._streams if self.enforce else self.limit

    def estimated_streams(self) -> int:
        """Streams held at real time with the margin, enforced or not."""
        return self._streams

    def per_stream_speed(self, streams: int) -> float | None:
        """How many times real time each of `streams` streams runs."""
        seconds = self.step_seconds(streams)
        return None if seconds is None else self.unit_seconds / seconds

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
