"""Figures of a load level, as its listeners lived it.

Each request's chunk arrivals are replayed through a listener's playback clock
(chorus.playback: playback starts `start_buffer_s` after the first audio; a late
chunk is an underrun and the listener waits for it). A stream is held real time when
not one sample came late. Refused requests (RESOURCE_EXHAUSTED) are counted apart:
they were never admitted, so they cannot be late.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from chorus import orpheus
from chorus.playback import PlaybackClock
from tools.bench.load import LevelRun, RequestRecord


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


def figures(run: LevelRun, start_buffer_s: float) -> LevelFigures:
    completed = [r for r in run.records if r.ok]
    refused = [r for r in run.records if r.code == "RESOURCE_EXHAUSTED"]
    failed = [r for r in run.records if not r.ok and r.code != "RESOURCE_EXHAUSTED"]
    heard = [listen(r, start_buffer_s) for r in completed]
    ttfa_ms = [r.ttfa_s * 1000 for r in completed if r.ttfa_s is not None]
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
        underruns=sum(h.underruns for h in heard),
        stall_seconds=sum(h.stall_seconds for h in heard),
        chunk_gap_p95_ms=_percentile(gaps_ms, 95),
        chunk_gap_max_ms=max(gaps_ms) if gaps_ms else None,
        errors=tuple(sorted({f"{r.code}: {r.details}" for r in failed + refused})),
    )


def table(levels: list[LevelFigures], ceiling: dict[int, float] | None = None) -> str:
    """A Markdown table, the ceiling's audio s/s beside Chorus's when measured."""
    def ms(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.0f}"

    head = ["concurrent"] + (["ceiling audio s/s"] if ceiling else []) + [
        "audio s/s", "of ceiling", "held real time", "TTFA p50/p95/p99 ms", "stall s", "chunk gap p95/max ms",
        "refused", "failed"]
    if not ceiling:
        head.remove("of ceiling")
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for f in levels:
        row = [str(f.concurrency)]
        if ceiling:
            c = ceiling.get(f.concurrency)
            row += [f"{c:.2f}" if c else "n/a", f"{f.audio_per_wall:.2f}", f"{f.audio_per_wall / c:.0%}" if c else "n/a"]
        else:
            row += [f"{f.audio_per_wall:.2f}"]
        row += [
            f"{f.held_real_time}/{f.completed}",
            f"{ms(f.ttfa_p50_ms)}/{ms(f.ttfa_p95_ms)}/{ms(f.ttfa_p99_ms)}",
            f"{f.stall_seconds:.2f}",
            f"{ms(f.chunk_gap_p95_ms)}/{ms(f.chunk_gap_max_ms)}",
            str(f.refused),
            str(f.failed),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)
