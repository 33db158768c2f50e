"""The streaming decoder's precisions side by side, in one run: speed and fidelity.

Precision is a property of each decoder, not of the process, so every arm shares
one process and one model, and the arms alternate within each round (their order
reversed every other round) so that a neighbour's load on shared cores falls on all
of them alike. Each arm decodes --frames frames a stream, 1 frame a step as served,
noise on and seeded, at 1 and 4 streams a forward, on 1 and 2 torch threads
(OMP_WAIT_POLICY as the worker sets it); the
figure is audio seconds per wall second, the median over --rounds rounds, and the
speed-up is against fp32's median; the same runs' audio seconds per process CPU
second, which a neighbour's load on shared cores disturbs less, come beside it.
SNR is each arm's audio against fp32's for the same stream (noise off and on).

--compile adds an arm that is not shipped: bf16 with Snake (the decoder's
elementwise activation, x + sin^2(a x) / a) fused by torch.compile, the one fusion
the layer-by-layer streaming loop leaves room for; its compile time is reported.

    python benchmarks/decoder_modes.py [--snac-dir models/demo/snac] [--rounds 5] [--frames 24] [--compile]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chorus.realtime.cpu_budget import sleep_idle_threads  # noqa: E402

sleep_idle_threads()  # as the worker's entry point does, before torch loads OpenMP
import services.codec_worker  # noqa: E402,F401  (MKL's mode, before torch starts)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from chorus.speech.orpheus import CODEBOOK_SIZE, CODES_PER_FRAME, SAMPLE_RATE, SAMPLES_PER_FRAME  # noqa: E402
from services.codec_worker import numeric_mode, precision  # noqa: E402
from services.codec_worker import streaming_decoder as sd  # noqa: E402
from services.codec_worker.model import load_snac  # noqa: E402

BATCHES = (1, 4)
THREADS = (1, 2)


class _CompiledSnake(sd._Snake):
    """Snake through torch.compile (dynamic shapes), for the --compile arm."""

    _fn = None

    @classmethod
    def fn(cls):
        if cls._fn is None:
            # One graph per channel count, batch-1 specialization and thread count:
            # past dynamo's default of 8 the rest would silently run eager.
            torch._dynamo.config.recompile_limit = 64
            cls._fn = torch.compile(lambda x, a, inv: x + (x * a).sin().square() * inv, dynamic=True)
        return cls._fn

    def step(self, x, st, ctx):
        return self.fn()(x, self.alpha, self.inv_alpha)


def compiled_snake_decoder(model, decoder_precision: str) -> sd.StreamingSnacDecoder:
    original = sd._Snake
    sd._Snake = _CompiledSnake  # the builder looks the class up by name
    try:
        return sd.StreamingSnacDecoder(model, precision=decoder_precision)
    finally:
        sd._Snake = original


def decode_seconds(decoder, codes: np.ndarray) -> tuple[float, float]:
    """(wall, process CPU) seconds to stream codes (batch, frames, 7), one frame a
    step, and flush."""
    states = [decoder.new_stream(seed=k + 1) for k in range(len(codes))]
    started, cpu_started = time.perf_counter(), time.process_time()
    for i in range(codes.shape[1]):
        decoder.decode([(state, codes[k, i : i + 1]) for k, state in enumerate(states)])
    for state in states:
        decoder.flush(state)
    return time.perf_counter() - started, time.process_time() - cpu_started


def stream_audio(decoder, codes: np.ndarray, deterministic: bool) -> np.ndarray:
    torch.set_num_threads(1)
    state = decoder.new_stream(seed=7, deterministic=deterministic)
    parts = [c.samples for i in range(len(codes)) if (c := decoder.decode([(state, codes[i : i + 1])])[0])]
    parts.append(decoder.flush(state).samples)
    return np.concatenate(parts).astype(np.float64)


def snr_db(reference: np.ndarray, other: np.ndarray) -> float:
    noise = np.sum((reference - other) ** 2)
    return float("inf") if noise == 0 else float(10 * np.log10(np.sum(reference**2) / noise))


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--snac-dir", type=Path, default=ROOT / "models" / "demo" / "snac")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--frames", type=int, default=24, help="frames a stream in each timed decode")
    p.add_argument("--compile", action="store_true", help="add the bf16 + torch.compile'd Snake arm")
    p.add_argument("--json", action="store_true", help="print the figures as JSON only")
    args = p.parse_args()

    model = load_snac(args.snac_dir, device="cpu").model
    arms = {name: sd.StreamingSnacDecoder(model, precision=name) for name in ("fp32", "bf16")}
    compile_s = None
    if args.compile:
        arms["bf16+compiled-snake"] = compiled_snake_decoder(model, "bf16")
    rng = np.random.default_rng(0)
    # Warm-up, compile included: every arm at every batch and thread count once.
    for name, decoder in arms.items():
        started = time.perf_counter()
        for threads in THREADS:
            torch.set_num_threads(threads)
            for batch in BATCHES:
                decode_seconds(decoder, rng.integers(0, CODEBOOK_SIZE, (batch, 4, CODES_PER_FRAME)))
        if name == "bf16+compiled-snake":
            compile_s = time.perf_counter() - started

    timings: dict[tuple[str, int, int], list[float]] = {}
    cpu_timings: dict[tuple[str, int, int], list[float]] = {}
    names = list(arms)
    for r in range(args.rounds):
        for threads in THREADS:
            torch.set_num_threads(threads)
            for batch in BATCHES:
                codes = rng.integers(0, CODEBOOK_SIZE, (batch, args.frames, CODES_PER_FRAME))
                audio_s = batch * args.frames * SAMPLES_PER_FRAME / SAMPLE_RATE
                for name in names if r % 2 == 0 else reversed(names):
                    wall, cpu = decode_seconds(arms[name], codes)
                    timings.setdefault((name, threads, batch), []).append(audio_s / wall)
                    cpu_timings.setdefault((name, threads, batch), []).append(audio_s / cpu)

    codes = rng.integers(0, CODEBOOK_SIZE, (48, CODES_PER_FRAME))
    reference = {det: stream_audio(arms["fp32"], codes, det) for det in (True, False)}
    results = []
    for name, decoder in arms.items():
        row = {"arm": name, "snr_db_noise_off": snr_db(reference[True], stream_audio(decoder, codes, True)),
               "snr_db_noise_on": snr_db(reference[False], stream_audio(decoder, codes, False))}
        for threads in THREADS:
            for batch in BATCHES:
                rate = statistics.median(timings[(name, threads, batch)])
                base = statistics.median(timings[("fp32", threads, batch)])
                row[f"audio_s_per_s@b{batch}t{threads}"] = rate
                row[f"speedup@b{batch}t{threads}"] = rate / base
                cpu_rate = statistics.median(cpu_timings[(name, threads, batch)])
                row[f"audio_s_per_cpu_s@b{batch}t{threads}"] = cpu_rate
                row[f"cpu_speedup@b{batch}t{threads}"] = cpu_rate / statistics.median(cpu_timings[("fp32", threads, batch)])
        results.append(row)
    summary = {
        "cpu": cpu_name(), "bf16_kernels": precision.bf16_kernels(), "auto": precision.resolve("auto"),
        "mkl_mode": numeric_mode.current(), "torch": torch.__version__, "rounds": args.rounds,
        "frames": args.frames, "compile_s": compile_s, "arms": results,
    }
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"CPU {summary['cpu']}, bf16 kernels {summary['bf16_kernels']}, auto -> {summary['auto']}, "
          f"MKL {summary['mkl_mode']}, torch {summary['torch']}; median of {args.rounds} rounds, "
          f"{args.frames} frames a stream, 1 frame a step, noise on")
    if compile_s is not None:
        print(f"compiled-snake warm-up (compiles included): {compile_s:.1f} s")
    header = ["arm"] + [f"b{b} t{t}" for t in THREADS for b in BATCHES] + ["SNR off", "SNR on"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in results:
        cells = [row["arm"]]
        for threads in THREADS:
            for batch in BATCHES:
                key = f"b{batch}t{threads}"
                cells.append(f"{row[f'audio_s_per_s@{key}']:.2f} ({row[f'speedup@{key}']:.2f}x)")
        cells += [f"{row['snr_db_noise_off']:.1f} dB", f"{row['snr_db_noise_on']:.1f} dB"]
        print("| " + " | ".join(cells) + " |")
    print("\naudio seconds per process CPU second (speed-up against fp32), same runs:")
    print("| " + " | ".join(header[:-2]) + " |")
    print("|" + "---|" * (len(header) - 2))
    for row in results:
        cells = [row["arm"]] + [
            f"{row[f'audio_s_per_cpu_s@b{b}t{t}']:.2f} ({row[f'cpu_speedup@b{b}t{t}']:.2f}x)"
            for t in THREADS for b in BATCHES
        ]
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
