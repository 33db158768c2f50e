"""Streaming encoders: fed in uneven chunks, decoded back as one file by an independent
decoder (libsndfile, or FFmpeg's raw demuxers for headerless formats)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from chorus.speech.audio_formats import FORMATS, NATIVE_RATE, for_extension
from gateway.encoding import StreamEncoder
from audio_check import assert_decoded_length, decode

SECONDS = 1.5
CHUNKS = (2048, 1000, 37, 4096, 1)  # uneven on purpose: frames, odd sizes, a single sample


def _signal(n: int = int(SECONDS * NATIVE_RATE)) -> np.ndarray:
    t = np.arange(n) / NATIVE_RATE
    return (8000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)


def _encode(fmt_name: str, rate: int, pcm: np.ndarray) -> tuple[list[bytes], bytes, int]:
    """(pieces returned while streaming, bytes returned by finish, samples reported)."""
    encoder = StreamEncoder(FORMATS[fmt_name], rate)
    pieces, reported, pos, i = [], 0, 0, 0
    while pos < pcm.size:
        size = CHUNKS[i % len(CHUNKS)]
        out = encoder.encode(pcm[pos : pos + size])
        pieces.append(out.data)
        reported += out.num_samples
        pos += size
        i += 1
    last = encoder.finish()
    return pieces, last.data, reported + last.num_samples


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 24000, 44100, 48000])
@pytest.mark.parametrize("fmt_name", sorted(FORMATS))
def test_streamed_output_decodes_with_the_right_length_and_rate(fmt_name, rate):
    fmt = FORMATS[fmt_name]
    if rate not in fmt.rates:
        with pytest.raises(ValueError, match="does not support"):
            StreamEncoder(fmt, rate)
        return
    pcm = _signal()
    pieces, tail, reported = _encode(fmt_name, rate, pcm)
    data = b"".join(pieces) + tail
    decoded, decoded_rate = decode(fmt_name, rate, data)

    expected = round(pcm.size * rate / NATIVE_RATE)
    assert decoded_rate == rate
    assert abs(reported - expected) <= 1  # what AudioChunk.num_samples adds up to
    assert_decoded_length(fmt_name, decoded.size, expected, rate)
    # Streaming, not buffering: most bytes came out before finish().
    assert sum(map(len, pieces)) > len(data) / 2


@pytest.mark.parametrize("fmt_name", ["pcm", "wav"])
def test_lossless_formats_keep_the_samples_at_the_native_rate(fmt_name):
    pcm = _signal()
    pieces, tail, _ = _encode(fmt_name, NATIVE_RATE, pcm)
    decoded, _ = decode(fmt_name, NATIVE_RATE, b"".join(pieces) + tail)
    np.testing.assert_array_equal(decoded, pcm)


def test_wav_header_comes_first_with_streaming_sizes():
    pieces, _, _ = _encode("wav", 16000, _signal())
    first = next(p for p in pieces if p)
    assert first[:4] == b"RIFF" and first[8:12] == b"WAVE"
    assert first[4:8] == b"\xff\xff\xff\xff"  # size unknown while streaming
    assert sf.info(io.BytesIO(first + b"".join(pieces[1:]))).samplerate == 16000


def test_mulaw_round_trip_is_close_to_the_input():
    pcm = _signal()
    pieces, tail, _ = _encode("mulaw", NATIVE_RATE, pcm)
    decoded, _ = decode("mulaw", NATIVE_RATE, b"".join(pieces) + tail)
    assert decoded.size == pcm.size
    # G.711 keeps about 8 bits of relative precision.
    error = np.abs(decoded.astype(np.int32) - pcm.astype(np.int32))
    assert error.max() <= np.abs(pcm.astype(np.int32)).max() / 16


def test_chunked_resampling_equals_resampling_the_whole_signal():
    pcm = _signal()
    pieces, tail, _ = _encode("pcm", 16000, pcm)
    whole = StreamEncoder(FORMATS["pcm"], 16000)
    at_once = whole.encode(pcm).data + whole.finish().data
    assert b"".join(pieces) + tail == at_once


def test_close_without_finish_is_safe_and_final():
    encoder = StreamEncoder(FORMATS["opus"], 48000)
    encoder.encode(_signal(4096))
    encoder.close()
    encoder.close()  # twice is fine
    # Once closed, FFmpeg's state is gone: further calls are refused, not a crash.
    with pytest.raises(ValueError, match="closed"):
        encoder.encode(_signal(4096))
    with pytest.raises(ValueError, match="closed"):
        encoder.finish()


def test_extension_picks_the_format():
    assert for_extension("out.WAV").name == "wav"
    assert for_extension("x.opus").name == "opus"
    assert for_extension("x.ogg").name == "opus"
    assert for_extension("x.ulaw").name == "mulaw"
    assert for_extension("x.txt") is None


@pytest.mark.parametrize("tempo", [0.25, 0.5, 1.5, 2.0, 4.0])
def test_tempo_time_stretches_to_the_expected_length(tempo):
    pcm = _signal()
    encoder = StreamEncoder(FORMATS["pcm"], 16000, tempo=tempo)
    data = b"".join(encoder.encode(pcm[i : i + 1000]).data for i in range(0, pcm.size, 1000))
    data += encoder.finish().data
    decoded, _ = decode("pcm", 16000, data)
    expected = pcm.size * 16000 / NATIVE_RATE / tempo
    assert abs(decoded.size - expected) <= expected * 0.02 + 160
    assert encoder.samples_out == decoded.size
    # Stretched, not silenced: the tone is still there.
    assert np.abs(decoded).max() > 4000


def test_tempo_out_of_range_is_refused():
    with pytest.raises(ValueError, match="tempo"):
        StreamEncoder(FORMATS["pcm"], 24000, tempo=5.0)
