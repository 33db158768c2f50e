"""Streaming audio encoders: 24 kHz int16 PCM in, pieces of one valid file out.

Every format goes through FFmpeg (PyAV) the same way: an `AudioResampler` to the
requested rate, then the format's encoder and muxer writing into a sink that the
caller drains after each chunk. The sink has no `seek`, so muxers that would go back
to patch a header (WAV sizes, MP3 Xing frame) write their streaming form instead,
and the concatenation of everything returned is a complete file.

The resampler keeps its filter state across chunks, so a stream resampled chunk by
chunk is the same as the whole signal resampled at once: no seams at chunk or
segment boundaries, and the flush at the end returns the filter's tail so that the
output length is the input length times the rate ratio.
"""

from __future__ import annotations

from dataclasses import dataclass

import av
import numpy as np

from chorus.audio_formats import NATIVE_RATE, AudioFormat


@dataclass(frozen=True)
class Encoded:
    data: bytes
    # Samples at the output rate that this piece completes (for progress).
    num_samples: int


class _Sink:
    """A write-only file for FFmpeg's muxer: no seek, so the output streams."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        out = b"".join(self._parts)
        self._parts.clear()
        return out


class StreamEncoder:
    """Feed int16 mono PCM at 24 kHz with `encode`, end with `finish`.

    Not thread-safe; one per response stream. `close` releases FFmpeg state early
    (a cancelled stream) and is safe to call twice.
    """

    def __init__(self, fmt: AudioFormat, sample_rate: int = NATIVE_RATE) -> None:
        if sample_rate not in fmt.rates:
            raise ValueError(f"{fmt.name} does not support {sample_rate} Hz (supported: {fmt.rates})")
        self.format = fmt
        self.sample_rate = sample_rate
        self.samples_out = 0
        self._sink = _Sink()
        # Each packet goes out as soon as it is muxed: the client is waiting for its
        # first audio, not for FFmpeg's 32 KiB I/O buffer to fill.
        self._container = av.open(
            self._sink,
            mode="w",
            format=fmt.muxer,
            container_options={"flush_packets": "1", **fmt.muxer_options},
        )
        self._stream = self._container.add_stream(fmt.codec, rate=sample_rate, layout="mono")
        self._resampler = av.AudioResampler(format="s16", layout="mono", rate=sample_rate)
        self._closed = False

    def encode(self, pcm: np.ndarray) -> Encoded:
        """Encodes the next samples; returns whatever bytes the muxer released (may be empty)."""
        samples = np.ascontiguousarray(pcm, dtype=np.int16).reshape(1, -1)
        if samples.shape[1] == 0:
            return Encoded(b"", 0)
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = NATIVE_RATE
        return self._push(self._resampler.resample(frame), flush=False)

    def finish(self) -> Encoded:
        """Flushes the resampler, the encoder and the muxer; the last bytes of the file."""
        out = self._push(self._resampler.resample(None), flush=True)
        self._container.close()
        self._closed = True
        return Encoded(out.data + self._sink.take(), out.num_samples)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self._container.close()
            except (av.error.FFmpegError, ValueError):
                pass  # abandoned mid-stream: nothing left that anyone will read

    def _push(self, frames: list[av.AudioFrame], flush: bool) -> Encoded:
        produced = 0
        for frame in frames:
            produced += frame.samples
            for packet in self._stream.encode(frame):
                self._container.mux(packet)
        if flush:
            for packet in self._stream.encode(None):
                self._container.mux(packet)
        self.samples_out += produced
        return Encoded(self._sink.take(), produced)

