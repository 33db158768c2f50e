"""Decoding the gateway's formats back with decoders independent of its encoders
(libsndfile; FFmpeg's demuxers and decoders for headerless G.711, ADTS AAC and streamed FLAC), and how long each format's
decoded audio may be, shared by the encoder unit tests and the end-to-end tests."""

from __future__ import annotations

import io

import av
import numpy as np
import soundfile as sf


def decode(fmt_name: str, rate: int, data: bytes) -> tuple[np.ndarray, int]:
    """(int16 samples, sample rate) of a complete stream in format `fmt_name`."""
    if fmt_name == "pcm":
        return np.frombuffer(data, dtype="<i2"), rate
    # A streamed FLAC says "total samples unknown", which libsndfile cannot read
    # (it seeks); FFmpeg's FLAC decoder can.
    if fmt_name in ("mulaw", "alaw", "aac", "flac"):
        demuxer = {"mulaw": "mulaw", "alaw": "alaw", "aac": "aac", "flac": "flac"}[fmt_name]
        options = {"sample_rate": str(rate)} if fmt_name in ("mulaw", "alaw") else {}
        with av.open(io.BytesIO(data), format=demuxer, options=options) as container:
            stream = container.streams.audio[0]
            frames = [f.to_ndarray().reshape(-1) for f in container.decode(stream)]
            return np.concatenate(frames), stream.rate
    samples, decoded_rate = sf.read(io.BytesIO(data), dtype="int16")
    return samples, decoded_rate


def assert_decoded_length(fmt_name: str, decoded: int, expected: int, rate: int) -> None:
    """`decoded` samples is what `expected` samples encoded in `fmt_name` decode to."""
    if fmt_name == "mp3":
        # A streamed MP3 has no LAME tag (it would need a seek back), so decoders
        # keep the encoder delay and the last frame's padding: up to three frames more.
        assert expected <= decoded <= expected + 3 * 1152, (decoded, expected)
    elif fmt_name == "aac":
        # ADTS cannot say how much priming and padding to drop: 1024 samples of
        # encoder delay, and the last frame's padding (under 1024).
        assert expected + 1024 <= decoded <= expected + 2048, (decoded, expected)
    elif fmt_name == "opus":
        assert abs(decoded - expected) <= rate // 50, (decoded, expected)  # one 20 ms Opus frame
    else:
        assert abs(decoded - expected) <= 1, (decoded, expected)
