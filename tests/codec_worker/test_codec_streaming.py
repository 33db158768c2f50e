"""The streaming SNAC decoder, on the demo SNAC weights.

With noise off, streamed audio must equal `SNAC.decode` of the whole sequence: the
reference patches NoiseBlock.forward to the identity rather than building the model
with noise=False, which would shift module indices and load weights wrongly.
"""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch
from snac.layers import NoiseBlock

from chorus.speech.orpheus import CODEBOOK_SIZE, CODES_PER_FRAME, SAMPLES_PER_FRAME, frames_to_layers
from services.codec_worker.model import ModelLoadError, load_snac
from services.codec_worker.streaming_decoder import StreamingSnacDecoder

N_FRAMES = 24  # 2 s of audio: ten times the decoder's reach of 2.32 frames
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def model(snac_dir):
    torch.manual_seed(0)
    return load_snac(snac_dir, device="cpu").model


@pytest.fixture(scope="module")
def decoder(model):
    # fp32, pinned: the worker's "auto" is bf16 on CPUs with native bf16, whose audio
    # is close to SNAC.decode's (tests/codec_worker/test_decoder_precision.py) but not within 1e-4.
    return StreamingSnacDecoder(model, precision="fp32")


def random_frames(seed: int, n: int = N_FRAMES) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, CODEBOOK_SIZE, (n, CODES_PER_FRAME))


@pytest.fixture(scope="module")
def frames():
    return random_frames(1)


def reference_decode(model, frames: np.ndarray) -> np.ndarray:
    codes = [torch.from_numpy(layer)[None] for layer in frames_to_layers(frames)]
    with torch.inference_mode(), mock.patch.object(NoiseBlock, "forward", lambda self, x: x):
        return model.decode(codes)[0, 0].numpy()


@pytest.fixture(scope="module")
def reference(model, frames):
    return reference_decode(model, frames)


def stream_decode(decoder, frames, chunk: int, **stream_args):
    """Feeds `chunk` frames a step; returns (audio, frames fed before the first audio)."""
    state = decoder.new_stream(**stream_args)
    start = state.first_frame_index * SAMPLES_PER_FRAME
    parts, first_audio_after = [], None
    for lo in range(0, len(frames), chunk):
        (piece,) = decoder.decode([(state, frames[lo : lo + chunk])])
        if piece is not None:
            first_audio_after = first_audio_after or lo + chunk
            parts.append(piece)
    tail = decoder.flush(state)
    if tail is not None:
        parts.append(tail)
    offset = max(start, stream_args.get("resume_from_sample", 0))
    for piece in parts:
        assert piece.sample_offset == offset, "chunks must be contiguous"
        offset += len(piece.samples)
    return np.concatenate([p.samples for p in parts]), first_audio_after


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_stream_matches_whole_sequence_decode(decoder, frames, reference, chunk):
    audio, first_audio_after = stream_decode(decoder, frames, chunk, deterministic=True)
    assert len(reference) == N_FRAMES * SAMPLES_PER_FRAME
    assert len(audio) == len(reference)
    assert np.abs(audio - reference).max() < TOLERANCE
    # The decoder's reach is 2.32 frames, so the third frame completes the first audio.
    assert first_audio_after <= -(-3 // chunk) * chunk


def test_batched_streams_equal_unbatched(decoder):
    streams = [random_frames(seed, 12) for seed in (10, 11, 12)]
    alone = [stream_decode(decoder, f, 1, deterministic=True)[0] for f in streams]
    states = [decoder.new_stream(deterministic=True) for _ in streams]
    parts: list[list[np.ndarray]] = [[] for _ in streams]
    # Streams 0 and 1 step together; stream 2 feeds 2 frames a step, so it forms a
    # group of its own in the same call.
    for step in range(12):
        items = [(states[0], streams[0][step : step + 1]), (states[1], streams[1][step : step + 1])]
        if step % 2 == 0:
            items.append((states[2], streams[2][step : step + 2]))
        for k, piece in enumerate(decoder.decode(items)):
            if piece is not None:
                parts[k].append(piece.samples)
    for k, state in enumerate(states):
        tail = decoder.flush(state)
        parts[k].append(tail.samples)
        batched = np.concatenate(parts[k])
        assert len(batched) == len(alone[k]) == 12 * SAMPLES_PER_FRAME
        assert batched.tobytes() == alone[k].tobytes()  # bit-exact (tests/codec_worker/test_codec_determinism.py)


def test_noise_mode_differs_but_is_finite(decoder, frames, reference):
    noisy, _ = stream_decode(decoder, frames[:12], 1, deterministic=False)
    quiet = reference[: 12 * SAMPLES_PER_FRAME]
    assert len(noisy) == 12 * SAMPLES_PER_FRAME
    assert np.isfinite(noisy).all()
    assert np.abs(noisy).max() <= 1.0
    # Only the tail of the 12-frame clip differs from the 24-frame reference by context.
    assert np.abs(noisy[:8 * SAMPLES_PER_FRAME] - quiet[:8 * SAMPLES_PER_FRAME]).max() > 1e-3


def test_resume_at_frame_offset_matches_from_resume_point(decoder, frames, reference):
    # Failover: the new worker gets 3 frames of context before the frame it resumes at.
    resume_frame, context = 12, 3
    first = resume_frame - context
    resume_sample = resume_frame * SAMPLES_PER_FRAME + 100
    audio, _ = stream_decode(
        decoder, frames[first:], 1, first_frame_index=first, resume_from_sample=resume_sample, deterministic=True
    )
    assert len(audio) == N_FRAMES * SAMPLES_PER_FRAME - resume_sample
    assert np.abs(audio - reference[resume_sample:]).max() < TOLERANCE


def test_missing_model_dir_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_snac(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="no pytorch_model.bin"):
        load_snac(tmp_path)
