"""Median and range of a figure over repeated runs.

On a shared 2-vCPU VM one run of a level moved the ceiling by 20% from the next
(docs/benchmarks.md), as much as the effects being tuned, so every figure that
decides anything is reported as the median of its repeats beside their min-max: a
reader sees at once whether two figures differ by more than the machine's noise.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Spread:
    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Iterable[float | None]) -> Spread | None:
        """None when no run had the figure (a level where nothing was held has no TTFA of held streams)."""
        present = [float(v) for v in values if v is not None]
        if not present:
            return None
        return cls(float(np.median(present)), min(present), max(present))

    def text(self, digits: int = 2) -> str:
        """'2.36' when the runs agree to the digits shown (or there was one), else '2.36 [2.10-2.50]'."""
        median, low, high = (f"{v:.{digits}f}" for v in (self.median, self.low, self.high))
        return median if low == high else f"{median} [{low}-{high}]"


def median_index(keys: Sequence[tuple]) -> int:
    """Index of the run whose key is the median of `keys`: with an even count, the lower
    of the two middle ones (a real run, never an average of two), ties kept in run order."""
    if not keys:
        raise ValueError("no runs")
    order = sorted(range(len(keys)), key=lambda i: keys[i])
    return order[(len(order) - 1) // 2]
