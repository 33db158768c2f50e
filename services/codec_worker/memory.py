"""Giving the decode thread's freed memory back to the operating system.

A codec worker's RSS grew with load (0.47 GB idle, 2.5 GB after bursts of 16
concurrent streams) and stayed there. It is not a leak: every stream's state is
dropped when the stream ends, and the same load run with glibc's dynamic mmap
threshold turned off (MALLOC_MMAP_THRESHOLD_=131072) stays at 0.5 GB throughout.
It is glibc holding freed memory: each decode step allocates temporaries of many
sizes (batch and frame counts vary) between the streams' long-lived caches, so the
heap fragments and freed pages stay mapped. A fixed low mmap threshold would cure it
at 2.4x the CPU per second of audio (every step faults fresh pages), so instead
`malloc_trim(0)` returns the free pages shortly after streams end, at most once per
interval: the cost (about 25 ms of the trimming thread's time per trim) stays off
the hot path, and RSS returns to the working set of the streams still open
(docs/reliability.md has the curves).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
from typing import Callable

log = logging.getLogger(__name__)

TRIM_INTERVAL_S = 1.0
# While streams stay open, trim only once RSS grew this much since the last trim: a
# trim under load costs the decode thread re-faulting the pages it needs again (a
# trim every second cost ~15% of throughput at 8 streams), so a heap that holds
# steady is left alone, and one that grows is cut back.
TRIM_GROWTH_BYTES = 256 * 1024 * 1024


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none (musl, macOS)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def resident_bytes() -> int | None:
    """This process's RSS, or None where /proc is not there."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def should_trim(streams_left: int, rss: int | None, baseline: int, growth_bytes: int) -> bool:
    """After streams ended: trim when none is left, or when RSS (None: unknown) grew
    by `growth_bytes` over what it was after the last trim."""
    return streams_left == 0 or rss is None or rss - baseline >= growth_bytes


class HeapTrimmer:
    """A thread that trims the heap a moment after streams end: always once none is
    left, and while some are open only if RSS grew by `growth_bytes` since the last
    trim; at most once per `interval_s`.

    `trim` and `rss` are injectable for tests; without glibc there is nothing to trim
    and the trimmer does nothing.
    """

    def __init__(
        self,
        interval_s: float = TRIM_INTERVAL_S,
        growth_bytes: int = TRIM_GROWTH_BYTES,
        trim: Callable[[int], int] | None = None,
        rss: Callable[[], int | None] = resident_bytes,
    ) -> None:
        self.interval_s = interval_s
        self.growth_bytes = growth_bytes
        self._trim = trim if trim is not None else _malloc_trim()
        self._rss = rss
        self._ended = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._streams_left = 0
        self._baseline = rss() or 0
        self.trims = 0

    def start(self) -> None:
        if self._trim is None or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="heap-trim", daemon=True)
        self._thread.start()

    def stream_ended(self, streams_left: int) -> None:
        """A stream let go of its state, `streams_left` remain (callable from any thread)."""
        self._streams_left = streams_left
        self._ended.set()

    def stop(self) -> None:
        self._stopping.set()
        self._ended.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while True:
            self._ended.wait()
            # Ends close together share one decision, and the decode thread meanwhile
            # drops the ended streams' state (it does so at its next step).
            if self._stopping.wait(self.interval_s):
                return
            self._ended.clear()
            if not should_trim(self._streams_left, self._rss(), self._baseline, self.growth_bytes):
                continue
            try:
                self._trim(0)
            except Exception:  # a trim is an optimisation: never let it take the worker down
                log.exception("malloc_trim failed")
            self.trims += 1
            self._baseline = self._rss() or 0
