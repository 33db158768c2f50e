"""`chorus bench`: the listener's replay and the level figures on made-up arrivals, the
loopback rule, and one short sweep through a real stack."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from chorus import orpheus
from tools.bench.command import is_loopback
from tools.bench.load import LevelRun, RequestRecord
from tools.bench.report import figures, listen, table

FRAME = orpheus.SAMPLES_PER_FRAME
FRAME_S = orpheus.FRAME_SECONDS


def record(index: int, sent_at: float, arrivals: list[float], code: str = "OK") -> RequestRecord:
    return RequestRecord(index, sent_at, [(t, FRAME) for t in arrivals], code=code)


def test_a_stream_fed_ahead_of_its_listener_is_held():
    steady = record(0, 0.0, [0.1 + i * FRAME_S * 0.5 for i in range(10)])  # twice real time
    heard = listen(steady, start_buffer_s=0.15)
    assert heard.underruns == 0 and heard.stall_seconds == 0.0
    assert heard.max_chunk_gap_s == pytest.approx(FRAME_S * 0.5)


def test_a_late_chunk_is_an_underrun_with_its_stall():
    # First frame at 0.1 (plays 0.25..0.335), the second only at 1.0: 0.665 s late.
    late = record(0, 0.0, [0.1, 1.0, 1.0 + FRAME_S])
    heard = listen(late, start_buffer_s=0.15)
    assert heard.underruns == 1
    assert heard.stall_seconds == pytest.approx(1.0 - (0.25 + FRAME_S))


def test_level_figures_count_held_late_refused_and_throughput():
    run = LevelRun(2, 0.0, 2.0, [
        record(0, 0.0, [0.2 + i * 0.04 for i in range(12)]),           # held
        record(1, 0.0, [0.3, 2.0]),                                     # late
        record(2, 0.5, [], code="RESOURCE_EXHAUSTED"),                  # refused: never admitted
    ])
    f = figures(run, start_buffer_s=0.15)
    assert (f.requests, f.completed, f.refused, f.failed) == (3, 2, 1, 0)
    assert (f.held_real_time, f.late_streams, f.underruns) == (1, 1, 1)
    assert f.audio_seconds == pytest.approx(14 * FRAME_S)
    assert f.audio_per_wall == pytest.approx(14 * FRAME_S / 2.0)
    assert f.ttfa_p50_ms == pytest.approx(250.0)
    assert f.chunk_gap_max_ms == pytest.approx(1700.0)
    assert not f.all_admitted_held
    text = table([f], ceiling={2: 4.0})
    assert "| 2 | 4.00 |" in text and "1/2" in text


@pytest.mark.parametrize("address, loopback", [
    ("127.0.0.1:50051", True), ("localhost:1", True), ("[::1]:50051", True), ("10.1.2.3:50051", False),
])
def test_the_sweep_runs_on_loopback_only(address, loopback):
    assert is_loopback(address) is loopback


def test_a_remote_gateway_is_refused():
    done = subprocess.run([sys.executable, "-m", "tools.cli", "bench", "--gateway", "10.1.2.3:50051"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "loopback only" in done.stderr


def test_a_short_sweep_through_a_real_stack_writes_figures_and_plots(demo_models, tmp_path):
    out = tmp_path / "bench"
    done = subprocess.run(
        [sys.executable, "-m", "tools.cli", "bench", "--models", str(demo_models.root), "--levels", "1,2",
         "--requests", "2", "--frames", "6", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "bench.json").read_text())
    levels = {level["concurrency"]: level for level in result["levels"]}
    assert set(levels) == {1, 2}
    for level in levels.values():
        assert level["completed"] == 2 and level["failed"] == 0
        assert level["audio_seconds"] == pytest.approx(2 * 6 * FRAME_S)
        assert level["ttfa_p50_ms"] > 0
    assert (out / "sweep.png").stat().st_size > 1000
    assert (out / "timeline-2.png").stat().st_size > 1000
    assert "| 1 |" in done.stdout and "| 2 |" in done.stdout
