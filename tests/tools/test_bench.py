"""`chorus bench`: the listener's replay and the level figures on made-up arrivals, the
median of repeated runs, N*, the loopback rule, the command lines, a short ceiling
measurement and one short sweep through a real stack."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest

from chorus.speech import orpheus
from tools.bench import ceiling as ceiling_bench
from tools.bench.ceiling import Split, best_by_batch, combinations, n_star, thread_splits
from tools.bench.command import is_loopback, register, stack_options
from tools.bench.load import LevelRun, RequestRecord
from tools.bench.report import LevelRuns, figures, listen, max_playing, table
from tools.bench.stats import Spread, median_index

pytestmark = pytest.mark.slow  # over 15 s: started first (tests/conftest.py)

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


def test_streams_playing_at_once_and_the_ttfa_of_held_streams():
    # 0 and 1 overlap; 2 starts the instant 1 ends (not overlapping); 3 is late.
    run = LevelRun(3, 0.0, 4.0, [
        record(0, 0.0, [0.1 + i * 0.04 for i in range(10)]),           # held, TTFA 100 ms, audio 0.1..0.46
        record(1, 0.0, [0.3 + i * 0.04 for i in range(11)]),           # held, TTFA 300 ms, audio 0.3..0.7
        record(2, 0.6, [0.7 + i * 0.04 for i in range(5)]),            # held, TTFA 100 ms, audio 0.7..0.86
        record(3, 2.0, [2.5, 3.5]),                                     # late, TTFA 500 ms
        record(4, 2.0, [], code="RESOURCE_EXHAUSTED"),
    ])
    f = figures(run, start_buffer_s=0.15)
    assert (f.held_real_time, f.late_streams) == (3, 1)
    assert f.max_playing == 2
    assert f.held_ttfa_p50_ms == pytest.approx(100.0)
    assert f.held_ttfa_p95_ms == pytest.approx(280.0)  # numpy's linear percentile of 100, 100, 300
    assert f.ttfa_p50_ms == pytest.approx(200.0)  # every completed stream: the late one counts here


def test_playing_at_once_counts_one_chunk_streams_and_nothing_for_no_audio():
    assert max_playing([]) == 0
    assert max_playing([record(0, 0.0, [1.0])]) == 1
    assert max_playing([record(0, 0.0, [1.0]), record(1, 0.0, [0.5, 1.5]), record(2, 0.0, [], code="UNAVAILABLE")]) == 2


def level_with(held: int, audio_per_wall: float, concurrency: int = 2):
    """A level's figures with these held and audio s/s, the rest from one real replay."""
    base = figures(LevelRun(concurrency, 0.0, 1.0, [record(0, 0.0, [0.1, 0.15])]), 0.15)
    return replace(base, held_real_time=held, audio_per_wall=audio_per_wall, completed=4, requests=4)


def test_the_median_run_is_a_real_run_picked_by_held_count_then_audio():
    runs = LevelRuns(2, (level_with(3, 1.0), level_with(1, 2.0), level_with(2, 1.5)))
    assert runs.median_index == 2
    assert runs.spread("held_real_time") == Spread(2.0, 1.0, 3.0)
    assert runs.spread("audio_per_wall") == Spread(1.5, 1.0, 2.0)
    # Equal held counts: audio s/s decides; an even count takes the lower middle run.
    assert LevelRuns(2, (level_with(2, 1.9), level_with(2, 1.1), level_with(2, 1.5))).median_index == 2
    assert median_index([(4, 0.0), (1, 0.0), (3, 0.0), (2, 0.0)]) == 3
    saved = runs.as_dict()
    assert saved["median_run"] == 2 and saved["held_real_time"] == 2 and len(saved["runs"]) == 3
    assert saved["held_per_run"] == ["3/4", "1/4", "2/4"]
    assert saved["spread"]["audio_per_wall"] == {"median": 1.5, "low": 1.0, "high": 2.0}
    text = table([runs], ceiling={2: Spread(3.0, 2.8, 3.2)})
    assert "| 2 | 3.00 [2.80-3.20] | 1.50 [1.00-2.00] | 50% | 2/4 | 3/4, 1/4, 2/4 |" in text


def test_n_star_is_the_largest_level_with_15_percent_room():
    assert n_star({1: 2.40, 2: 3.39, 4: 2.90, 8: 3.39}) == 2
    assert n_star({1: 2.0, 2: 2.0, 4: 4.6}) == 4  # a dip at 2 does not hide 4; exactly 1.15x counts
    assert n_star({1: 1.1, 2: 2.2}) is None
    assert n_star({}) is None


def trial(batch, llama, torch, backbone, decoder, n=0, fps=1):
    return Split(batch, llama, torch, fps, backbone, decoder, n)


def test_the_ceiling_is_the_best_combination_by_its_median_trial():
    splits = [
        trial(2, 1, 1, 5.0, 3.0, 0), trial(2, 1, 1, 5.0, 2.0, 1), trial(2, 1, 1, 1.0, 9.0, 2),  # ceilings 3, 2, 1
        trial(2, 2, 1, 9.0, 2.5, 0), trial(2, 2, 1, 9.0, 2.5, 1), trial(2, 2, 1, 9.0, 0.1, 2),  # 2.5, 2.5, 0.1
    ]
    by_combination = {(c.llama_threads, c.torch_threads): c for c in combinations(splits)}
    assert by_combination[(1, 1)].ceiling == Spread(2.0, 1.0, 3.0)
    assert by_combination[(1, 1)].backbone_audio_s == Spread(5.0, 1.0, 5.0)
    best = best_by_batch(splits)[2]
    assert (best.llama_threads, best.torch_threads, best.trials) == (2, 1, 3)
    assert best.ceiling.median == 2.5


@pytest.mark.parametrize("cpus, oversubscribed, pairs", [
    (1, False, [(1, 1)]),  # neither pool goes below one thread
    (2, False, [(1, 1)]),
    (2, True, [(1, 1), (1, 2), (2, 1), (2, 2)]),
    (4, False, [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (3, 1)]),
])
def test_the_ceiling_searches_only_splits_that_fit_the_cpus_unless_asked(cpus, oversubscribed, pairs):
    assert thread_splits(cpus, oversubscribed) == pairs


def bench_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chorus")
    register(parser.add_subparsers(dest="command"), "bench", "")
    return parser


def test_the_command_lines_take_repeat_and_decoder_precision(capsys):
    defaults = bench_parser().parse_args(["bench"])
    assert (defaults.repeat, defaults.decoder_precision) == (3, "auto")
    args = bench_parser().parse_args(["bench", "--repeat", "5", "--decoder-precision", "fp32", "--ceiling"])
    assert (args.repeat, args.decoder_precision, args.ceiling) == (5, "fp32", True)
    for wrong in (["--repeat", "0"], ["--decoder-precision", "fp16"]):
        with pytest.raises(SystemExit):
            bench_parser().parse_args(["bench", *wrong])
    args = ceiling_bench.parser().parse_args(["--repeat", "2", "--decoder-precision", "bf16", "--cpus", "1",
                                              "--oversubscribed"])
    assert (args.repeat, args.decoder_precision, args.cpus, args.oversubscribed) == (2, "bf16", 1, True)
    assert ceiling_bench.parser().parse_args([]).repeat == 3


def test_the_stack_gets_the_benchs_decoder_precision_unless_a_stack_arg_names_one():
    assert stack_options(["llama_threads=2"], "fp32") == ({"llama_threads": 2, "decoder_precision": "fp32"}, "fp32")
    assert stack_options([], "auto") == ({"decoder_precision": "auto"}, "auto")
    assert stack_options(["decoder_precision=bf16"], "auto") == ({"decoder_precision": "bf16"}, "bf16")


def test_a_short_pinned_ceiling_measures_every_trial_and_restores_affinity(demo_models):
    before = os.sched_getaffinity(0)
    measured = ceiling_bench.measure(demo_models.gguf, demo_models.snac_dir, [1], seconds=0.3, frames=6,
                                     frames_per_step=(1,), cpus=1, repeat=2)
    assert os.sched_getaffinity(0) == before
    assert [(s.batch, s.llama_threads, s.torch_threads, s.trial) for s in measured.splits] == [
        (1, 1, 1, 0), (1, 1, 1, 1)]
    assert all(s.backbone_audio_s > 0 and s.decoder_audio_s > 0 for s in measured.splits)
    assert measured.decoder_precision in ("fp32", "bf16") and (measured.cpus, measured.pinned) == (1, True)
    saved = measured.as_json()
    assert saved["best"]["1"]["trials"] == 2 and "n_star" in saved and len(saved["splits"]) == 2
    assert "N* = " in measured.table()


def test_the_neutts_ceiling_runs_its_own_backbone_beside_the_neucodec_decoder(demo_models):
    """`family="neutts-air"`: the NeuTTS demo backbone (its prompt holds a reference,
    phonemized) and the streaming NeuCodec decoder, both measured; the models come from
    MODELS/neutts, built beside the demo models as `chorus serve` builds them."""
    backbone, neucodec_dir = ceiling_bench.family_models(demo_models.root, "neutts-air")
    measured = ceiling_bench.measure(backbone, neucodec_dir, [1], seconds=0.3, frames=30, frames_per_step=(1,),
                                     cpus=1, repeat=1, family="neutts-air")
    (split,) = measured.splits
    assert split.backbone_audio_s > 0 and split.decoder_audio_s > 0 and measured.decoder_precision == "fp32"
    assert neucodec_dir.name == "neucodec" and backbone.parent.name == "neutts"


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
         "--requests", "2", "--frames", "6", "--repeat", "2", "--out", str(out)],
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
        assert level["repeat"] == 2 and len(level["runs"]) == 2 and level["median_run"] in (0, 1)
        assert 1 <= level["max_playing"] <= level["concurrency"]
    assert [len(run["records"]) for run in result["requests"]["2"]] == [2, 2]
    assert (out / "sweep.png").stat().st_size > 1000
    assert (out / "timeline-2.png").stat().st_size > 1000
    assert "| 1 |" in done.stdout and "| 2 |" in done.stdout


def test_a_sweep_of_the_neutts_family_speaks_its_demo_voice_in_its_own_frames(demo_models, tmp_path):
    """`chorus bench --family neutts-air`: the stack with both families, requests in
    NeuCodec frames (50 a second) for the demo voice, and the ceiling of its own models
    (its backbone beside the streaming NeuCodec decoder) in the same run."""
    out = tmp_path / "bench"
    done = subprocess.run(
        [sys.executable, "-m", "tools.cli", "bench", "--models", str(demo_models.root), "--family", "neutts-air",
         "--levels", "1", "--requests", "2", "--frames", "40", "--repeat", "1", "--out", str(out),
         "--ceiling", "--ceiling-seconds", "0.3",
         "--stack-arg", "calibrate=0"],  # capacity is not what this test measures
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "bench.json").read_text())
    (level,) = result["levels"]
    assert result["family"] == "neutts-air" and result["frames_per_request"] == 40
    assert level["completed"] == 2 and level["failed"] == 0
    assert level["audio_seconds"] == pytest.approx(2 * 40 * 0.02)
    splits = result["ceiling"]["splits"]
    assert splits and all(s["backbone_audio_s"] > 0 and s["decoder_audio_s"] > 0 for s in splits)
    assert result["ceiling"]["decoder_precision"] == "fp32" and "measuring the neutts-air ceiling" in done.stderr
