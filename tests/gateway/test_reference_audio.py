"""Reference recordings for cloned voices: what the door accepts, and what it refuses with a reason."""

from __future__ import annotations

import io
import struct
import wave

import av
import numpy as np
import pytest

from gateway.reference_audio import REFERENCE_RATE, ReferenceAudioError, read_reference


def speech_like(seconds: float, rate: int, level: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (level * np.sin(2 * np.pi * 180 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)


def pcm16_wav(samples: np.ndarray, rate: int, channels: int = 1) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        frames = np.repeat(samples[:, None], channels, axis=1) if channels > 1 else samples
        w.writeframes((np.clip(frames, -1, 1) * 32767).astype("<i2").tobytes())
    return out.getvalue()


def float_wav(samples: np.ndarray, rate: int) -> bytes:
    """IEEE-float WAV (format 3), which may carry NaN and infinity."""
    data = samples.astype("<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, rate, rate * 4, 4, 32)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def flac(samples: np.ndarray, rate: int) -> bytes:
    out = io.BytesIO()
    with av.open(out, "w", format="flac") as container:
        stream = container.add_stream("flac", rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray((samples * 32767).astype(np.int16)[None, :], format="s16", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return out.getvalue()


@pytest.mark.parametrize(("label", "data", "source_rate"), [
    ("16 kHz WAV", pcm16_wav(speech_like(3, 16_000), 16_000), 16_000),
    ("48 kHz stereo WAV", pcm16_wav(speech_like(3, 48_000), 48_000, channels=2), 48_000),
    ("24 kHz FLAC", flac(speech_like(3, 24_000), 24_000), 24_000),
    ("44.1 kHz float WAV", float_wav(speech_like(3, 44_100), 44_100), 44_100),
])
def test_a_good_recording_comes_out_16_khz_mono_of_its_length(label, data, source_rate):
    reference = read_reference(data)
    assert reference.source_rate == source_rate
    assert reference.samples.dtype == np.float32 and reference.samples.ndim == 1
    assert reference.seconds == pytest.approx(3.0, abs=0.02)
    assert reference.samples.size == pytest.approx(3 * REFERENCE_RATE, abs=0.02 * REFERENCE_RATE)
    assert 0.2 < np.abs(reference.samples).max() <= 1.0  # the level survives the conversion


@pytest.mark.parametrize(("label", "data", "message"), [
    ("empty", b"", "empty"),
    ("not audio", bytes(range(256)) * 40, "not audio FFmpeg can open"),
    ("8 kHz", pcm16_wav(speech_like(3, 8_000), 8_000), "8000 Hz; it must be at least 16000 Hz"),
    ("too short", pcm16_wav(speech_like(0.5, 16_000), 16_000), "0.50 s long; it must be at least 1 s"),
    ("too long", pcm16_wav(speech_like(31, 16_000), 16_000), "longer than 30 s"),
    ("silence", pcm16_wav(np.zeros(3 * 16_000, np.float32), 16_000), "silent or nearly so"),
    ("hiss", pcm16_wav(speech_like(3, 16_000, level=0.002), 16_000), "silent or nearly so"),
    ("NaN", float_wav(np.full(3 * 16_000, np.nan, np.float32), 16_000), "not numbers"),
    ("too big", b"RIFF" + bytes(17 * 1024 * 1024), "at most 16,777,216 are read"),
])
def test_an_unusable_recording_is_refused_with_what_to_change(label, data, message):
    with pytest.raises(ReferenceAudioError, match=message):
        read_reference(data)
