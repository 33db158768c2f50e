"""Codec worker benchmark, everything measured side by side in one run, on CPU.

1. One stream of ~10 s of audio (118 frames), noise off, decoded three ways:
   - Chorus's streaming decoder fed 1 frame at a time;
   - the usual Orpheus decoder: for each new frame, SNAC.decode of the last 4 frames
     and keep samples 2048:4096 of that window;
   - one whole-sequence SNAC.decode (the reference).
   For each: compute (process CPU seconds) per second of audio, ratio to the
   whole-sequence decode, audio lost at the ends, max abs diff and SNR against the
   whole-sequence decode. Best of --repeats runs, interleaved.
2. Throughput of the decode engine (decode_engine.py) at 1, 2, 4 and 8 concurrent streams,
   each stream feeding its next frame as soon as the previous one came back as audio
   (1-frame steps, as behind a token server), with batching off (max_batch 1),
   batching without waiting, and batching with a 5 ms wait (the CPU default).
   --noise runs these streams with (seeded) noise on, as served by default.

With --baseline REV, the streaming decoder of git revision REV is measured beside
the current one in the same run, interleaved, to price a change to it; a third part
then compares their CPU time per audio second directly, 1 thread, 1/4/8 streams a
forward, noise off and on, as the median of interleaved pairs (wall-clock throughput
on a shared machine varies too much for a few percent to show):

    python benchmarks/bench_codec.py [--snac-dir models/demo/snac] [--json out.json] [--baseline REV] [--noise]

Without --snac-dir it writes the demo SNAC (real 24 kHz architecture, random weights).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from snac.layers import NoiseBlock

from chorus.speech.orpheus import CODEBOOK_SIZE, CODES_PER_FRAME, SAMPLE_RATE, SAMPLES_PER_FRAME, frames_to_layers
from services.codec_worker.decode_engine import Audio, DecodeEngine, End
from services.codec_worker.model import load_snac
from services.codec_worker.streaming_decoder import StreamingSnacDecoder

ORPHEUS_WINDOW_FRAMES = 4
ORPHEUS_KEEP = slice(2048, 4096)


def random_frames(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, CODEBOOK_SIZE, (n, CODES_PER_FRAME))


def snac_decode(model, frames: np.ndarray) -> np.ndarray:
    codes = [torch.from_numpy(layer)[None] for layer in frames_to_layers(frames)]
    return model.decode(codes)[0, 0].numpy()


def whole_sequence(model, decoder, frames) -> tuple[np.ndarray, int]:
    """Returns (audio, index of its first sample in the whole-sequence timeline)."""
    return snac_decode(model, frames), 0


def orpheus_windows(model, decoder, frames) -> tuple[np.ndarray, int]:
    out = []
    for n in range(ORPHEUS_WINDOW_FRAMES, len(frames) + 1):
        out.append(snac_decode(model, frames[n - ORPHEUS_WINDOW_FRAMES : n])[ORPHEUS_KEEP])
    # The first window's kept samples are its second frame's.
    return np.concatenate(out), ORPHEUS_KEEP.start


def load_baseline_decoder(rev: str, model):
    """The StreamingSnacDecoder of git revision `rev`, built on `model`, taking (and
    ignoring) a seed if it predates them."""
    path = "services/codec_worker/streaming_decoder.py"
    source = subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, text=True, check=True).stdout
    module_file = Path(tempfile.mkdtemp()) / "baseline_streaming_decoder.py"
    module_file.write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_streaming_decoder", module_file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return _SeedTolerant(module.StreamingSnacDecoder(model))


class _SeedTolerant:
    def __init__(self, decoder) -> None:
        self._decoder = decoder

    def __getattr__(self, name):
        return getattr(self._decoder, name)

    def new_stream(self, *args, seed: int = 0, **kwargs):
        try:
            return self._decoder.new_stream(*args, seed=seed, **kwargs)
        except TypeError:
            return self._decoder.new_stream(*args, **kwargs)


def streaming(model, decoder: StreamingSnacDecoder, frames) -> tuple[np.ndarray, int]:
    state = decoder.new_stream(deterministic=True)
    out = [decoder.decode([(state, frames[i : i + 1])])[0] for i in range(len(frames))]
    out.append(decoder.flush(state))
    chunks = [c for c in out if c is not None]
    return np.concatenate([c.samples for c in chunks]), chunks[0].sample_offset


METHODS = {
    "streaming decoder, 1 frame a step": streaming,
    "Orpheus 4-frame window per frame": orpheus_windows,
    "whole-sequence SNAC.decode": whole_sequence,
}


def bench_single_stream(model, decoders: dict, n_frames: int, repeats: int) -> list[dict]:
    """decoders: label -> streaming decoder; the first is the current one."""
    frames = random_frames(n_frames, seed=0)
    audio_s = n_frames * SAMPLES_PER_FRAME / SAMPLE_RATE
    current = next(iter(decoders.values()))
    runs = {}
    for name, method in METHODS.items():
        if method is streaming:
            for label, decoder in decoders.items():
                runs[name if decoder is current else f"{name} ({label})"] = (method, decoder)
        else:
            runs[name] = (method, current)
    cpu = {name: [] for name in runs}
    wall = {name: [] for name in runs}
    outputs = {}
    with torch.inference_mode(), mock.patch.object(NoiseBlock, "forward", lambda self, x: x):
        for _ in range(repeats):
            for name, (method, decoder) in runs.items():
                c0, w0 = time.process_time(), time.perf_counter()
                outputs[name] = method(model, decoder, frames)
                cpu[name].append(time.process_time() - c0)
                wall[name].append(time.perf_counter() - w0)
    reference, _ = outputs["whole-sequence SNAC.decode"]
    base = min(cpu["whole-sequence SNAC.decode"])
    rows = []
    for name in runs:
        audio, start = outputs[name]
        ref = reference[start : start + len(audio)]
        err = (audio - ref).astype(np.float64)
        noise = float(np.sum(err**2))
        rows.append({
            "method": name,
            "cpu_s_per_audio_s": min(cpu[name]) / audio_s,
            "wall_s_per_audio_s": min(wall[name]) / audio_s,
            "vs_whole": min(cpu[name]) / base,
            "lost_start": start,
            "lost_end": len(reference) - start - len(audio),
            "max_abs_diff": float(np.abs(err).max()),
            "snr_db": None if noise == 0 else float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / noise)),
        })
    return rows


async def paced_stream(engine: DecodeEngine, frames: np.ndarray, noise: bool, seed: int) -> int:
    """Feeds the next frame as soon as the last one came back as audio; returns samples."""
    stream = engine.open_stream(deterministic=not noise, seed=seed)
    # The third frame completes the first audio; from then on, one frame in flight.
    sent = 3
    stream.submit(frames[:sent])
    samples = 0
    while True:
        item = await stream.get()
        if isinstance(item, End):
            return samples
        assert isinstance(item, Audio), item
        samples += item.samples
        if sent < len(frames):
            stream.submit(frames[sent : sent + 1])
            sent += 1
            if sent == len(frames):
                stream.finish()


def bench_engine(decoder, concurrency: int, n_frames: int, max_batch: int, wait_ms: float, noise: bool) -> dict:
    engine = DecodeEngine(decoder, max_batch=max_batch, batch_wait_ms=wait_ms)
    engine.start()

    async def run() -> list[int]:
        return await asyncio.gather(
            *(paced_stream(engine, random_frames(n_frames, seed=i), noise, seed=i) for i in range(concurrency))
        )

    started = time.perf_counter()
    samples = asyncio.run(run())
    wall = time.perf_counter() - started
    engine.stop()
    assert all(s == n_frames * SAMPLES_PER_FRAME for s in samples)
    audio_s = sum(samples) / SAMPLE_RATE
    return {
        "concurrent": concurrency,
        "max_batch": max_batch,
        "batch_wait_ms": wait_ms,
        "audio_s_per_wall_s": audio_s / wall,
        "per_stream_x_realtime": audio_s / wall / concurrency,
        "mean_batch": engine.stats.streams_stepped / max(engine.stats.forwards, 1),
    }


def bench_paired(decoders: dict, pairs: int = 7, n_frames: int = 24) -> list[dict]:
    """Median CPU s per audio s of each decoder, and of their per-pair ratio."""
    (current_name, current), (baseline_name, baseline) = decoders.items()
    frames = random_frames(n_frames, seed=0)

    def cpu_per_audio_s(decoder, streams: int, noise: bool) -> float:
        states = [decoder.new_stream(deterministic=not noise, seed=i) for i in range(streams)]
        started = time.process_time()
        for i in range(n_frames):
            decoder.decode([(state, frames[i : i + 1]) for state in states])
        for state in states:
            decoder.flush(state)
        return (time.process_time() - started) / (streams * n_frames * SAMPLES_PER_FRAME / SAMPLE_RATE)

    rows = []
    for streams in (1, 4, 8):
        for noise in (False, True):
            runs = [(cpu_per_audio_s(current, streams, noise), cpu_per_audio_s(baseline, streams, noise))
                    for _ in range(pairs)]
            rows.append({
                "streams": streams,
                "noise": noise,
                current_name: float(np.median([a for a, _ in runs])),
                baseline_name: float(np.median([b for _, b in runs])),
                "ratio": float(np.median([a / b for a, b in runs])),
                "ratio_min": min(a / b for a, b in runs),
                "ratio_max": max(a / b for a, b in runs),
            })
    return rows


ENGINE_SETTINGS = (
    ("no batching", 1, 0.0),
    ("batching, no wait", 16, 0.0),
    ("batching, 5 ms wait (CPU default)", 16, 5.0),
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--snac-dir", type=Path, default=None, help="SNAC directory; default: write the demo one")
    p.add_argument("--frames", type=int, default=118, help="frames of the single-stream part (118 = 10.07 s)")
    p.add_argument("--engine-frames", type=int, default=48, help="frames per stream in the throughput part")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads for the single-stream part")
    p.add_argument("--engine-threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--baseline", metavar="REV", default=None,
                   help="also measure the streaming decoder of this git revision, interleaved")
    p.add_argument("--noise", action="store_true", help="engine streams with seeded noise on (the served default)")
    args = p.parse_args()

    snac_dir = args.snac_dir
    if snac_dir is None:
        from tools.demo_models.snac_dir import write_demo_snac

        snac_dir = write_demo_snac(Path(tempfile.mkdtemp()) / "snac")
    torch.manual_seed(0)
    model = load_snac(snac_dir, device="cpu").model
    decoders = {"current": StreamingSnacDecoder(model)}
    if args.baseline:
        decoders[f"baseline {args.baseline}"] = load_baseline_decoder(args.baseline, model)
    for decoder in decoders.values():
        decoder.warm_up()

    torch.set_num_threads(args.threads)
    single = bench_single_stream(model, decoders, args.frames, args.repeats)
    audio_s = args.frames * SAMPLES_PER_FRAME / SAMPLE_RATE
    print(f"## One stream, {args.frames} frames ({audio_s:.2f} s), noise off, {args.threads} torch thread(s), best of {args.repeats}\n")
    print("| method | CPU s / audio s | vs whole | wall s / audio s | lost start | lost end | max abs diff | SNR dB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in single:
        print(
            f"| {r['method']} | {r['cpu_s_per_audio_s']:.3f} | {r['vs_whole']:.2f}x | {r['wall_s_per_audio_s']:.3f} | "
            f"{r['lost_start']} | {r['lost_end']} | {r['max_abs_diff']:.2e} | "
            f"{'exact' if r['snr_db'] is None else format(r['snr_db'], '.1f')} |"
        )

    torch.set_num_threads(args.engine_threads)
    engine_rows = []
    print(
        f"\n## Decode engine, {args.engine_frames} frames a stream, 1 frame in flight a stream, "
        f"{args.engine_threads} torch thread(s), noise {'on' if args.noise else 'off'}\n"
    )
    print("| setting | streams | decoder | audio s / wall s | per stream x real time | mean streams per forward |")
    print("|---|---|---|---|---|---|")
    for label, max_batch, wait_ms in ENGINE_SETTINGS:
        for concurrency in (1, 2, 4, 8):
            for name, decoder in decoders.items():  # side by side, interleaved
                r = bench_engine(decoder, concurrency, args.engine_frames, max_batch, wait_ms, args.noise)
                r.update(setting=label, decoder=name)
                engine_rows.append(r)
                print(
                    f"| {label} | {concurrency} | {name} | {r['audio_s_per_wall_s']:.2f} | "
                    f"{r['per_stream_x_realtime']:.2f} | {r['mean_batch']:.2f} |",
                    flush=True,
                )
    paired = []
    if args.baseline:
        torch.set_num_threads(1)
        names = list(decoders)
        print(f"\n## CPU s per audio s, {names[0]} vs {names[1]}, 1 torch thread, median of 7 interleaved pairs\n")
        print(f"| streams a forward | noise | {names[0]} | {names[1]} | ratio (min-max) |")
        print("|---|---|---|---|---|")
        paired = bench_paired(decoders)
        for r in paired:
            print(
                f"| {r['streams']} | {'on' if r['noise'] else 'off'} | {r[names[0]]:.3f} | {r[names[1]]:.3f} | "
                f"{r['ratio']:.3f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) |",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps({"single_stream": single, "engine": engine_rows, "paired": paired}, indent=2))


if __name__ == "__main__":
    main()
