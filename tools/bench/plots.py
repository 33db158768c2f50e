"""PNG plots of a sweep: when each stream's audio arrived against when its listener
needed it (the median run of each level), and TTFA and throughput against concurrency."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from chorus.speech import orpheus
from tools.bench.load import LevelRun
from tools.bench.report import LevelRuns
from tools.bench.stats import Spread


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def chunk_timeline(run: LevelRun, start_buffer_s: float, path: Path) -> Path:
    """Audio received (s) against wall time (s) since the level began, one line per
    stream, each with the dashed line of its listener's schedule: a stream is held
    real time while its line stays above its schedule."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 5.5))
    for record in run.records:
        if not record.chunks:
            continue
        times, received, total = [], [], 0
        for arrival, samples in record.chunks:
            total += samples
            times.append(arrival - run.started_at)
            received.append(total / orpheus.SAMPLE_RATE)
        (line,) = ax.step(times, received, where="post", linewidth=1.2, label=f"request {record.index}")
        start = times[0] + start_buffer_s
        ax.plot([start, start + received[-1]], [0, received[-1]], linestyle="--", linewidth=0.8,
                color=line.get_color())
    ax.set_xlabel("seconds since the level began")
    ax.set_ylabel("seconds of audio received")
    ax.set_title(f"{run.concurrency} concurrent: audio received (solid) vs listener's schedule "
                 f"(dashed, {start_buffer_s * 1000:.0f} ms start buffer)")
    if len(run.records) <= 16:
        ax.legend(fontsize="x-small", ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sweep_summary(levels: list[LevelRuns], ceiling: Mapping[int, Spread] | None, path: Path) -> Path:
    """TTFA (p50, p95) and audio seconds per wall second against concurrency: each a
    median over the level's runs, its bar the runs' min-max, so that a difference
    smaller than the bars is the machine's noise, not the code's."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    xs = [lv.concurrency for lv in levels]

    def plot(ax, spreads: list[Spread | None], **style) -> None:
        present = [(x, s) for x, s in zip(xs, spreads) if s is not None]
        if not present:
            return
        ax.errorbar([x for x, _ in present], [s.median for _, s in present],
                    yerr=[[s.median - s.low for _, s in present], [s.high - s.median for _, s in present]],
                    capsize=3, **style)

    plot(left, [lv.spread("ttfa_p50_ms") for lv in levels], marker="o", label="p50")
    plot(left, [lv.spread("ttfa_p95_ms") for lv in levels], marker="o", label="p95")
    plot(left, [lv.spread("held_ttfa_p95_ms") for lv in levels], marker=".", linestyle=":",
         label="p95, held streams")
    left.set_xlabel("concurrent streams")
    left.set_ylabel("time to first audio (ms)")
    left.set_title("TTFA")
    left.legend()
    left.grid(alpha=0.3)
    plot(right, [lv.spread("audio_per_wall") for lv in levels], marker="o", label="Chorus")
    if ceiling:
        plot(right, [ceiling.get(x) for x in xs], marker="s", linestyle="--", label="ceiling")
    right.plot(xs, xs, linestyle=":", color="grey", label="real time for every stream")
    right.set_xlabel("concurrent streams")
    right.set_ylabel("audio seconds per wall second")
    right.set_title("Throughput")
    right.legend()
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
