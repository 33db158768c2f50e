"""Streaming audio encoders: 24 kHz int16 PCM in, pieces of one valid file out.

Every format goes through FFmpeg (PyAV) the same way: an `AudioResampler` to the
requested rate, then the format's encoder and muxer writing into a sink that the
caller drains after each chunk. The sink has no `seek`, so muxers that would go back
to patch a header (WAV sizes, MP3 Xing frame) write their streaming form instead,
and the concatenation of everything returned is a complete file. A file sent whole
once it is finished (the HTTP door's `stream: false`) gets the real lengths written
into that header by `whole_file`.

The resampler keeps its filter state across chunks, so a stream resampled chunk by
chunk is the same as the whole signal resampled at once: no seams at chunk or
segment boundaries, and the flush at the end returns the filter's tail so that the
output length is the input length times the rate ratio. A tempo other than 1 (the
OpenAI endpoint's `speed`) puts FFmpeg's atempo filter before the resampler: pitch
kept, length divided by the tempo.

FFmpeg's work grows with the number of streams, so it does not run on the gateway's
event loop: `OffloadedEncoder` runs each call on a small shared thread pool. One
stream awaits each call before making the next, so its bytes stay in order; a lock
per encoder keeps a late `close` (a cancelled stream) from racing a call still
running on a worker.
"""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np

from chorus.speech.audio_formats import NATIVE_RATE, AudioFormat, write_stream_lengths


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

    def __init__(self, fmt: AudioFormat, sample_rate: int = NATIVE_RATE, tempo: float = 1.0) -> None:
        if sample_rate not in fmt.rates:
            raise ValueError(f"{fmt.name} does not support {sample_rate} Hz (supported: {fmt.rates})")
        if not MIN_TEMPO <= tempo <= MAX_TEMPO:
            raise ValueError(f"tempo must be in [{MIN_TEMPO}, {MAX_TEMPO}], got {tempo}")
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
        self._stretch = _TempoFilter(tempo) if tempo != 1.0 else None
        self._closed = False

    def encode(self, pcm: np.ndarray) -> Encoded:
        """Encodes the next samples; returns whatever bytes the muxer released (may be empty)."""
        self._check_open()
        samples = np.ascontiguousarray(pcm, dtype=np.int16).reshape(1, -1)
        if samples.shape[1] == 0:
            return Encoded(b"", 0)
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = NATIVE_RATE
        if self._stretch is None:
            return self._push(self._resampler.resample(frame), flush=False)
        return self._push(self._resample_all(self._stretch.push(frame)), flush=False)

    def finish(self) -> Encoded:
        """Flushes the resampler, the encoder and the muxer; the last bytes of the file."""
        self._check_open()
        frames = [] if self._stretch is None else self._resample_all(self._stretch.push(None))
        out = self._push(frames + self._resampler.resample(None), flush=True)
        self._container.close()
        self._closed = True
        return Encoded(out.data + self._sink.take(), out.num_samples)

    def _check_open(self) -> None:
        # FFmpeg's freed state must never be touched again: a late call would crash
        # the process, not just fail.
        if self._closed:
            raise ValueError("the encoder is closed")

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self._container.close()
            except (av.error.FFmpegError, ValueError):
                pass  # abandoned mid-stream: nothing left that anyone will read

    def _resample_all(self, frames: list[av.AudioFrame]) -> list[av.AudioFrame]:
        return [out for frame in frames for out in self._resampler.resample(frame)]

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



def whole_file(fmt: AudioFormat, data: bytes, samples: int) -> bytes:
    """A finished stream as a file sent whole, with its real length in a WAV or FLAC
    header (chorus.speech.audio_formats.write_stream_lengths says why). `samples` is the
    number of samples at the output rate (StreamEncoder.samples_out)."""
    out = bytearray(data)
    return bytes(out) if write_stream_lengths(out, fmt, samples) else data


# FFmpeg's atempo takes 0.5..100 per instance; slower tempos chain instances. The
# OpenAI endpoint's `speed` range.
MIN_TEMPO = 0.25
MAX_TEMPO = 4.0


class _TempoFilter:
    """FFmpeg's atempo (WSOLA: duration changes, pitch does not) over a stream of frames."""

    def __init__(self, tempo: float) -> None:
        self._graph = av.filter.Graph()
        source = self._graph.add_abuffer(
            format="s16", sample_rate=NATIVE_RATE, layout="mono", time_base=Fraction(1, NATIVE_RATE)
        )
        stages = []
        while tempo < 0.5:  # atempo's lower bound per instance
            stages.append(0.5)
            tempo /= 0.5
        stages.append(tempo)
        node = source
        for stage in stages:
            stretch = self._graph.add("atempo", f"{stage:.6f}")
            node.link_to(stretch)
            node = stretch
        sink = self._graph.add("abuffersink")
        node.link_to(sink)
        self._graph.configure()
        self._source, self._sink = source, sink
        self._pts = 0

    def push(self, frame: av.AudioFrame | None) -> list[av.AudioFrame]:
        """Feeds a frame (None: the end) and returns what the filter released."""
        if frame is not None:
            frame.pts = self._pts
            frame.time_base = Fraction(1, NATIVE_RATE)
            self._pts += frame.samples
        self._source.push(frame)
        out = []
        while True:
            try:
                out.append(self._sink.pull())
            except (av.error.BlockingIOError, av.error.EOFError):
                return out


def _pool_size() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(2, min(4, cpus))


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def encoder_pool() -> ThreadPoolExecutor:
    """The gateway's encoder threads, made on first use: a few, shared by every stream."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=_pool_size(), thread_name_prefix="chorus-encoder")
        return _POOL


class OffloadedEncoder:
    """A StreamEncoder whose calls run on the encoder pool, awaited in order."""

    def __init__(self, encoder: StreamEncoder, executor: ThreadPoolExecutor | None = None) -> None:
        self._encoder = encoder
        self._executor = executor or encoder_pool()
        self._lock = threading.Lock()

    @property
    def samples_out(self) -> int:
        return self._encoder.samples_out

    async def encode(self, pcm: np.ndarray) -> Encoded:
        return await self._run(self._encoder.encode, pcm)

    async def finish(self) -> Encoded:
        return await self._run(self._encoder.finish)

    def close(self) -> None:
        """Releases FFmpeg's state once any call still running on a worker is done; returns at once."""
        self._executor.submit(self._locked, self._encoder.close)

    async def _run(self, method, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._locked, method, *args)

    def _locked(self, method, *args):
        with self._lock:
            return method(*args)
