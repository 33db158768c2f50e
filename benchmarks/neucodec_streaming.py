"""Streaming NeuCodec two ways against the one-pass decode, side by side in one run.

- Chorus (services/codec_worker/neucodec_streaming.py): a chunk's spectra from one
  window decode with context, the inverse STFT assembled incrementally, each sample
  added up once.
- The `neutts` package's streaming (neutts 1.4.1, `_infer_stream_ggml`), rebuilt here
  from its published scheme so that both run on the same decoder: decode overlapping
  windows of codes straight to audio (50 frames back, a 25-frame chunk, 5 ahead and
  1 of overlap on each side), keep the chunk plus its overlaps, and cross-fade
  neighbouring chunks with triangular weights; the rest of the stream in one last
  window.

Per arm: output length against the one-pass decode's (lost or extra samples), SNR
against it over the whole utterance, without its last 25 frames (neutts lays its
last window out apart), and in its worst 20 ms (where seams show),
frames decoded per frame of audio, decoder seconds per audio second (median of
rounds), and the frames the first audio waits for. Codes are random (seeded), frames
arrive one at a time, 1 torch thread.

    python benchmarks/neucodec_streaming.py [--model-dir DIR] [--frames 500] [--rounds 3]

Without --model-dir it builds the demo decoder (random weights) in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

from services.codec_worker.neucodec_model import NeuCodecDecoder, load_neucodec
from services.codec_worker.neucodec_streaming import (
    DEFAULT_CHUNK,
    DEFAULT_FIRST_CHUNK,
    DEFAULT_LOOKAHEAD,
    DEFAULT_LOOKBACK,
    StreamingNeuCodec,
)

SEGMENT_S = 0.02
# neutts's last window is laid out apart from the rest: a column leaves its frames out.
TAIL_FRAMES = 25


@dataclass
class Arm:
    name: str
    audio: np.ndarray
    seconds: float
    frames_decoded: int
    first_audio_frames: int | None


def chorus_arm(model: NeuCodecDecoder, codes: list[int], chunk: int, lookback: int, lookahead: int,
               first_chunk: int | None = None) -> Arm:
    stream = StreamingNeuCodec(model, chunk, lookback, lookahead, first_chunk)
    parts, first = [], None
    started = time.perf_counter()
    for i, code in enumerate(codes):
        out = stream.push([code])
        if first is None and out.size:
            first = i + 1
        parts.append(out)
    parts.append(stream.finish())
    seconds = time.perf_counter() - started
    first_grid = f"first chunk {stream.first_chunk}, then " if stream.first_chunk != chunk else ""
    return Arm(f"chorus {first_grid}chunk {chunk}, back {lookback}, ahead {lookahead}", np.concatenate(parts), seconds,
               stream.window_frames, first)


def _linear_overlap_add(chunks: list[np.ndarray], stride: int) -> np.ndarray:
    """Triangular cross-fade of chunks placed `stride` apart (the scheme neutts takes from EnCodec)."""
    total = max(stride * i + c.size for i, c in enumerate(chunks))
    out, weight_sum = np.zeros(total, dtype=np.float32), np.zeros(total, dtype=np.float32)
    for i, chunk in enumerate(chunks):
        t = np.linspace(0, 1, chunk.size + 2, dtype=np.float32)[1:-1]
        weight = 0.5 - np.abs(t - 0.5)
        out[stride * i : stride * i + chunk.size] += weight * chunk
        weight_sum[stride * i : stride * i + chunk.size] += weight
    return out / weight_sum


def neutts_arm(model: NeuCodecDecoder, codes: list[int], chunk: int = 25, lookback: int = 50,
               lookahead: int = 5, overlap: int = 1) -> Arm:
    hop = model.shape.hop
    stride = chunk * hop
    cache: list[int] = []
    audio_chunks: list[np.ndarray] = []
    parts: list[np.ndarray] = []
    emitted = decoded = frames_decoded = 0
    first = None

    def decode(window: list[int]) -> np.ndarray:
        nonlocal frames_decoded
        frames_decoded += len(window)
        return model.decode(torch.tensor([window], dtype=torch.int64))[0].numpy()

    started = time.perf_counter()
    for i, code in enumerate(codes):
        cache.append(code)
        if len(cache) - decoded >= chunk + lookahead:
            start = max(decoded - lookback - overlap, 0)
            end = decoded + chunk + lookahead + overlap
            sample_start = (decoded - start) * hop
            audio = decode(cache[start:end])
            audio_chunks.append(audio[sample_start : sample_start + (chunk + 2 * overlap) * hop])
            blended = _linear_overlap_add(audio_chunks, stride)
            new_end = len(audio_chunks) * stride
            parts.append(blended[emitted:new_end])
            emitted, decoded = new_end, decoded + chunk
            if first is None:
                first = i + 1
    remaining = len(cache) - decoded
    if remaining:
        start = max(len(cache) - (lookback + overlap + remaining), 0)
        sample_start = (len(cache) - start - remaining - overlap) * hop
        audio_chunks.append(decode(cache[start:])[sample_start:])
        parts.append(_linear_overlap_add(audio_chunks, stride)[emitted:])
    seconds = time.perf_counter() - started
    return Arm(f"neutts chunk {chunk}, back {lookback}, ahead {lookahead}, overlap {overlap}",
               np.concatenate(parts), seconds, frames_decoded, first)


def snr_db(audio: np.ndarray, reference: np.ndarray) -> float:
    n = min(audio.size, reference.size)
    noise = float(np.sum((audio[:n].astype(np.float64) - reference[:n]) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(float(np.sum(reference[:n].astype(np.float64) ** 2)) / noise)


def worst_segment_snr_db(audio: np.ndarray, reference: np.ndarray, segment: int) -> float:
    n = min(audio.size, reference.size) // segment * segment
    ref = reference[:n].astype(np.float64).reshape(-1, segment)
    noise = ((audio[:n].astype(np.float64) - reference[:n]) ** 2).reshape(-1, segment).sum(axis=1)
    with np.errstate(divide="ignore"):
        return float(np.min(10 * np.log10((ref**2).sum(axis=1) / noise)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", help="a NeuCodec directory (config.json + pytorch_model.bin)")
    parser.add_argument("--frames", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.model_dir:
        model = load_neucodec(args.model_dir)
    else:
        from tools.demo_models.neucodec_dir import write_demo_neucodec

        model = load_neucodec(write_demo_neucodec(tempfile.mkdtemp(prefix="neucodec-demo-")))
    hop, rate = model.shape.hop, model.shape.sample_rate
    generator = torch.Generator().manual_seed(args.seed)
    codes = torch.randint(0, model.shape.codebook_size, (args.frames,), generator=generator).tolist()
    audio_seconds = args.frames * hop / rate

    arms = {
        "one pass": lambda: _one_pass(model, codes),
        "chorus default": lambda: chorus_arm(model, codes, DEFAULT_CHUNK, DEFAULT_LOOKBACK, DEFAULT_LOOKAHEAD,
                                             DEFAULT_FIRST_CHUNK),
        "chorus, 8-frame chunks": lambda: chorus_arm(model, codes, 8, DEFAULT_LOOKBACK, DEFAULT_LOOKAHEAD),
        "chorus, neutts's window": lambda: chorus_arm(model, codes, 25, 50, 5),
        "neutts": lambda: neutts_arm(model, codes),
    }
    runs: dict[str, list[Arm]] = {name: [] for name in arms}
    for _ in range(args.rounds):  # interleaved rounds: drift on a shared VM hits every arm alike
        for name, run in arms.items():
            runs[name].append(run())
    reference = runs["one pass"][0].audio
    rows = []
    print(f"{args.frames} frames ({audio_seconds:.2f} s of audio), {args.rounds} rounds, 1 torch thread")
    print(f"| arm | samples vs one pass | SNR dB | SNR dB without the last {TAIL_FRAMES} frames | worst 20 ms SNR dB | "
          "frames decoded a frame | decoder s per audio s | first audio after frames |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, arm_runs in runs.items():
        arm = arm_runs[0]
        if any(not np.array_equal(r.audio, arm.audio) for r in arm_runs[1:]):
            raise SystemExit(f"{name}: rounds gave different audio")
        cost = [r.seconds / audio_seconds for r in arm_runs]
        row = {
            "arm": arm.name, "samples_minus_one_pass": int(arm.audio.size - reference.size),
            "snr_db": snr_db(arm.audio, reference),
            "snr_db_before_last_chunk": snr_db(arm.audio[: reference.size - TAIL_FRAMES * hop],
                                               reference[: reference.size - TAIL_FRAMES * hop]),
            "worst_segment_snr_db": worst_segment_snr_db(arm.audio, reference, int(SEGMENT_S * rate)),
            "frames_decoded_per_frame": arm.frames_decoded / args.frames,
            "decoder_s_per_audio_s": float(np.median(cost)), "cost_range": [min(cost), max(cost)],
            "first_audio_frames": arm.first_audio_frames,
        }
        rows.append(row)
        print(f"| {arm.name} | {row['samples_minus_one_pass']:+d} | {row['snr_db']:.1f} | "
              f"{row['snr_db_before_last_chunk']:.1f} | "
              f"{row['worst_segment_snr_db']:.1f} | {row['frames_decoded_per_frame']:.2f} | "
              f"{row['decoder_s_per_audio_s']:.4f} [{min(cost):.4f}-{max(cost):.4f}] | {row['first_audio_frames']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"frames": args.frames, "rounds": args.rounds, "arms": rows}, f, indent=2)


def _one_pass(model: NeuCodecDecoder, codes: list[int]) -> Arm:
    started = time.perf_counter()
    audio = model.decode(torch.tensor([codes], dtype=torch.int64))[0].numpy()
    return Arm("one pass (the whole utterance at the end)", audio, time.perf_counter() - started, len(codes),
               len(codes))


if __name__ == "__main__":
    main()
