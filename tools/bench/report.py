"""Figures of a load level, as its listeners lived it.

Each request's chunk arrivals are replayed through a listener's playback clock
(chorus.realtime.playback: playback starts `start_buffer_s` after the first audio; a late
chunk is an underrun and the listener waits for it). A stream is held real time when
not one sample came late. Refused requests (RESOURCE_EXHAUSTED) are counted apart:
they were never admitted, so they cannot be late.

A level offered C streams does not show how many were served at once: admission
may queue some behind others, so the held count alone cannot tell "C held at once"
from "C held one after another". `max_playing` (the most [first audio, last audio]
intervals that overlap) says which, and the TTFA of held streams says what the
streams that were held waited, apart from the queued ones.

`chorus bench` runs each level `repeat` times (LevelRuns): each figure that matters
is reported as median [min-max] over the runs, and one run, the median run, stands
for the level where a single run is needed (the timeline plot, the p99 and stall
columns): the run whose (held real time, audio s/s) is the median of the runs'.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np

from chorus.realtime.playback import PlaybackClock
from chorus.speech import orpheus
from tools.bench.load import LevelRun, RequestRecord
from tools.bench.stats import Spread, median_index


@dataclass(frozen=True)
class Listened:
    underruns: int
    stall_seconds: float
    max_chunk_gap_s: float


def listen(record: RequestRecord, start_buffer_s: float) -> Listened:
    clock = PlaybackClock(orpheus.SAMPLE_RATE, start_buffer_s)
    for arrival, samples in record.chunks:
        clock.deliver(samples, arrival)
    gaps = np.diff([arrival for arrival, _ in record.chunks]) if len(record.chunks) > 1 else np.zeros(1)
    return Listened(clock.underruns, clock.stall_seconds, float(gaps.max()))


@dataclass(frozen=True)
class LevelFigures:
    concurrency: int
    requests: int
    completed: int
    refused: int
    failed: int
    ttfa_p50_ms: float | None
    ttfa_p95_ms: float | None
    ttfa_p99_ms: float | None
    audio_seconds: float
    wall_seconds: float
    audio_per_wall: float
    held_real_time: int  # completed streams with not one late sample
    late_streams: int
    max_playing: int  # most streams between their first and last audio at one instant
    held_ttfa_p50_ms: float | None  # TTFA of the held streams only
    held_ttfa_p95_ms: float | None
    underruns: int
    stall_seconds: float
    chunk_gap_p95_ms: float | None
    chunk_gap_max_ms: float | None
    errors: tuple[str, ...]

    @property
    def all_admitted_held(self) -> bool:
        return self.completed > 0 and self.late_streams == 0 and self.failed == 0

    def as_dict(self) -> dict:
        return {**asdict(self), "all_admitted_held": self.all_admitted_held}


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def max_playing(records: list[RequestRecord]) -> int:
    """The most streams whose [first audio, last audio] intervals overlap at one instant.
    A stream ending at the instant another starts does not overlap it: the first
    listener is done before the second hears anything."""
    intervals = [(r.chunks[0][0], r.chunks[-1][0]) for r in records if r.chunks]
    starts = sorted(start for start, _ in intervals)
    ends = sorted(end for _, end in intervals)
    # The count is highest at some stream's start: those started by then, less those
    # ended by then, and the stream itself when all its audio came in one chunk.
    return max((bisect_right(starts, start) - bisect_right(ends, start) + (end <= start)
                for start, end in intervals), default=0)


def figures(run: LevelRun, start_buffer_s: float) -> LevelFigures:
    completed = [r for r in run.records if r.ok]
    refused = [r for r in run.records if r.code == "RESOURCE_EXHAUSTED"]
    failed = [r for r in run.records if not r.ok and r.code != "RESOURCE_EXHAUSTED"]
    heard = [listen(r, start_buffer_s) for r in completed]
    ttfa_ms = [r.ttfa_s * 1000 for r in completed if r.ttfa_s is not None]
    held_ttfa_ms = [r.ttfa_s * 1000 for r, h in zip(completed, heard) if h.underruns == 0 and r.ttfa_s is not None]
    gaps_ms = [gap * 1000 for r in completed for gap in np.diff([a for a, _ in r.chunks])]
    audio_seconds = sum(r.samples for r in run.records) / orpheus.SAMPLE_RATE
    wall = max(run.ended_at - run.started_at, 1e-9)
    return LevelFigures(
        concurrency=run.concurrency,
        requests=len(run.records),
        completed=len(completed),
        refused=len(refused),
        failed=len(failed),
        ttfa_p50_ms=_percentile(ttfa_ms, 50),
        ttfa_p95_ms=_percentile(ttfa_ms, 95),
        ttfa_p99_ms=_percentile(ttfa_ms, 99),
        audio_seconds=audio_seconds,
        wall_seconds=wall,
        audio_per_wall=audio_seconds / wall,
        held_real_time=sum(1 for h in heard if h.underruns == 0),
        late_streams=sum(1 for h in heard if h.underruns),
        max_playing=max_playing(run.records),
        held_ttfa_p50_ms=_percentile(held_ttfa_ms, 50),
        held_ttfa_p95_ms=_percentile(held_ttfa_ms, 95),
        underruns=sum(h.underruns for h in heard),
        stall_seconds=sum(h.stall_seconds for h in heard),
        chunk_gap_p95_ms=_percentile(gaps_ms, 95),
        chunk_gap_max_ms=max(gaps_ms) if gaps_ms else None,
        errors=tuple(sorted({f"{r.code}: {r.details}" for r in failed + refused})),
    )


# The figures that decide anything, reported as median [min-max] over a level's runs.
SPREAD_FIGURES = ("audio_per_wall", "held_real_time", "max_playing", "ttfa_p50_ms", "ttfa_p95_ms", "ttfa_p99_ms",
                  "held_ttfa_p50_ms", "held_ttfa_p95_ms", "stall_seconds")


@dataclass(frozen=True)
class LevelRuns:
    """One level's repeated runs on the same stack."""

    concurrency: int
    runs: tuple[LevelFigures, ...]

    @property
    def median_index(self) -> int:
        """The median run: the one whose (held real time, audio s/s) is the median of the
        runs' (held count first, audio s/s breaking ties; the lower middle one of an
        even count). A real run, so that its figures, its timeline and its requests
        belong together, which medians taken figure by figure would not."""
        return median_index([(f.held_real_time, f.audio_per_wall) for f in self.runs])

    @property
    def median_run(self) -> LevelFigures:
        return self.runs[self.median_index]

    def spread(self, name: str) -> Spread | None:
        return Spread.of(getattr(f, name) for f in self.runs)

    def as_dict(self) -> dict:
        """The median run's figures at the top (as a single run's were), then every run's."""
        return {
            **self.median_run.as_dict(),
            "repeat": len(self.runs),
            "median_run": self.median_index,
            "held_per_run": [f"{f.held_real_time}/{f.requests}" for f in self.runs],
            "spread": {name: (asdict(s) if (s := self.spread(name)) else None) for name in SPREAD_FIGURES},
            "runs": [f.as_dict() for f in self.runs],
        }


def table(levels: list[LevelRuns] | list[LevelFigures], ceiling: Mapping[int, float | Spread] | None = None) -> str:
    """A Markdown table, the ceiling's audio s/s beside Chorus's when measured.

    Figures are median [min-max] over a level's runs (just the value when the runs
    agree or there was one); "held real time" is the median run's held/completed and
    "held per run" each run's held/offered; chunk gaps, refused and failed are the
    median run's."""
    levels = [lv if isinstance(lv, LevelRuns) else LevelRuns(lv.concurrency, (lv,)) for lv in levels]
    repeated = any(len(lv.runs) > 1 for lv in levels)

    def ms(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.0f}"

    def spread(lv: LevelRuns, name: str, digits: int = 0) -> str:
        s = lv.spread(name)
        return "n/a" if s is None else s.text(digits)

    head = ["concurrent"] + (["ceiling audio s/s", "audio s/s", "of ceiling"] if ceiling else ["audio s/s"]) + [
        "held real time"] + (["held per run"] if repeated else []) + [
        "most playing at once", "TTFA p50/p95/p99 ms", "held streams' TTFA p50/p95 ms", "stall s",
        "chunk gap p95/max ms", "refused", "failed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for lv in levels:
        f = lv.median_run
        audio = lv.spread("audio_per_wall")
        row = [str(lv.concurrency)]
        if ceiling:
            c = ceiling.get(lv.concurrency)
            c_median = c.median if isinstance(c, Spread) else c
            c_text = "n/a" if not c else c.text() if isinstance(c, Spread) else f"{c:.2f}"
            row += [c_text, audio.text(), f"{audio.median / c_median:.0%}" if c_median else "n/a"]
        else:
            row += [audio.text()]
        row += [f"{f.held_real_time}/{f.completed}"]
        if repeated:
            row += [", ".join(f"{r.held_real_time}/{r.requests}" for r in lv.runs)]
        row += [
            spread(lv, "max_playing"),
            " / ".join(spread(lv, name) for name in ("ttfa_p50_ms", "ttfa_p95_ms", "ttfa_p99_ms")),
            " / ".join(spread(lv, name) for name in ("held_ttfa_p50_ms", "held_ttfa_p95_ms")),
            spread(lv, "stall_seconds", 2),
            f"{ms(f.chunk_gap_p95_ms)}/{ms(f.chunk_gap_max_ms)}",
            str(f.refused),
            str(f.failed),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)
