"""Streaming NeuCodec: frames in as the backbone writes them, each output sample computed once.

NeuCodec cannot stream exactly (neucodec_model.py: every spectrum depends on the whole
utterance), so the question is only where the approximation goes. The `neutts`
package decodes overlapping windows of codes to audio and cross-fades the audio of
neighbouring windows: the samples of each overlap are computed twice and blended, and
its defaults wait for 30 frames (0.6 s of audio) before the first chunk. Here the
approximation stays in the spectra, and the audio is assembled exactly from them:

- Frames are grouped into chunks on a grid fixed from the start of the stream: a
  short first chunk (`first_chunk` frames, so that the first audio comes early), then
  chunks of `chunk` frames (so that the context each window recomputes is paid over
  more frames). A chunk's spectra come from one decode of a window: `lookback` frames
  before it, the chunk, `lookahead` frames after (fewer at the stream's ends). Only
  the chunk's own spectra are kept, so every frame's spectrum is computed once.
- The inverse STFT is linear and local (a sample is the overlap-add of the 4 frames
  whose 1,920-sample windows cover it), so it runs incrementally on the kept spectra:
  every sample is added up once, from the same frames and with the same window
  envelope as the one-pass decode, and is emitted as soon as no later frame covers it.
  Given the one-pass spectra it gives the one-pass audio (to float rounding); every
  difference from the one-pass decode comes from the windows' missing context.

The grid does not move with how frames arrive: a chunk is decoded when its lookahead
is in, or at `finish` with whatever follows it. The same codes therefore give the
same windows, hence the same bits, however they are split into pushes. First audio
needs `first_chunk + lookahead` frames (or the whole stream if shorter). Nothing is lost:
N frames give N * hop samples, as the one-pass decode does.

This module knows nothing of gRPC or threads; torch runs on the caller's thread.
`NeuCodecStreams` puts it behind the decode engine's decoder interface.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from services.codec_worker.neucodec_model import NeuCodecDecoder
from services.codec_worker.streaming_decoder import Chunk

# Chosen on the demo decoder (docs/benchmarks.md "NeuCodec"): first audio after 12
# frames (240 ms of audio), about 3.2 frames through the model a frame of audio.
DEFAULT_FIRST_CHUNK = 8
DEFAULT_CHUNK = 24
DEFAULT_LOOKBACK = 48
DEFAULT_LOOKAHEAD = 4
# A day of audio: past it a resume point is nonsense, and refused as such.
MAX_RESUME_SAMPLE = 24_000 * 86_400


class OverlapAdd:
    """The inverse STFT's overlap-add with 'same' padding, fed frame by frame.

    Windowed frames of n_fft = 4 * hop samples arrive in order; frame j covers padded
    positions [j * hop, j * hop + n_fft), and output sample n is padded position
    n + (n_fft - hop) / 2. After frame j no later frame reaches below (j + 1) * hop,
    so those positions are final. Each frame is added as 4 hop-long blocks in a fixed
    order, so the sums do not depend on how frames are grouped into calls."""

    def __init__(self, window: torch.Tensor, hop: int) -> None:
        n_fft = window.numel()
        if n_fft != 4 * hop:
            raise ValueError(f"the window ({n_fft}) must span 4 hops ({hop})")
        self.hop = hop
        self._pad = (n_fft - hop) // 2
        self._square = (window.double() ** 2).numpy().reshape(4, hop)
        # Blocks of hop positions not yet final: sums of frames and of squared windows.
        self._sums = np.zeros((3, hop), dtype=np.float64)
        self._weights = np.zeros((3, hop), dtype=np.float64)
        self._frames = 0
        self._emitted = 0  # output samples given out

    def push(self, frames: np.ndarray) -> np.ndarray:
        """`frames`: (n_fft, k) windowed inverse FFTs of the next k frames; returns the
        samples they made final."""
        k = frames.shape[1]
        if k == 0:
            return np.zeros(0, dtype=np.float32)
        blocks = frames.T.astype(np.float64).reshape(k, 4, self.hop)
        sums = np.concatenate([self._sums, np.zeros((k, self.hop))])
        weights = np.concatenate([self._weights, np.zeros((k, self.hop))])
        for b in range(4):  # frame j's block b lands on block j + b; blocks in a fixed order
            sums[b : b + k] += blocks[:, b]
            weights[b : b + k] += self._square[b]
        self._frames += k
        self._sums, self._weights = sums[k:], weights[k:]
        return self._emit(sums[:k], weights[:k], (self._frames - k) * self.hop, self._frames * self.hop - self._pad)

    def finish(self) -> np.ndarray:
        """The samples after the last frame's final position: N frames make N * hop."""
        return self._emit(self._sums, self._weights, self._frames * self.hop, self._frames * self.hop)

    def _emit(self, sums: np.ndarray, weights: np.ndarray, first_padded: int, final_end: int) -> np.ndarray:
        """Samples up to output position `final_end` (exclusive) from consecutive blocks
        whose first starts at padded position `first_padded`."""
        begin = self._emitted + self._pad - first_padded  # index into the flattened blocks
        end = final_end + self._pad - first_padded
        flat_sums, flat_weights = sums.reshape(-1)[begin:end], weights.reshape(-1)[begin:end]
        if flat_sums.size == 0:
            return np.zeros(0, dtype=np.float32)
        out = np.divide(flat_sums, flat_weights, out=np.zeros_like(flat_sums), where=flat_weights > 0)
        self._emitted += out.size
        return out.astype(np.float32)


class StreamingNeuCodec:
    """One stream's decoder state: its codes so far, the next chunk on the grid, and
    the overlap-add."""

    def __init__(
        self,
        model: NeuCodecDecoder,
        chunk: int = DEFAULT_CHUNK,
        lookback: int = DEFAULT_LOOKBACK,
        lookahead: int = DEFAULT_LOOKAHEAD,
        first_chunk: int | None = DEFAULT_FIRST_CHUNK,
    ) -> None:
        """`first_chunk` None: every chunk is `chunk` frames."""
        first_chunk = chunk if first_chunk is None else first_chunk
        if chunk < 1 or first_chunk < 1 or lookback < 0 or lookahead < 0:
            raise ValueError("chunk and first_chunk must be at least 1, lookback and lookahead at least 0")
        self.model = model
        self.chunk, self.first_chunk, self.lookback, self.lookahead = chunk, first_chunk, lookback, lookahead
        window = model.generator.head.istft.window
        self._ola = OverlapAdd(window.detach().cpu(), model.shape.hop)
        self._codes: list[int] = []
        self._decoded = 0  # frames whose spectra went into the overlap-add
        self._finished = False
        self.windows = 0  # decodes run
        self.window_frames = 0  # frames fed through the model, context included

    @property
    def first_audio_frames(self) -> int:
        """Frames the first audio waits for, in a stream at least that long."""
        return self.first_chunk + self.lookahead

    def _chunk_end(self) -> int:
        """Where the next chunk on the grid ends (before clipping to the stream)."""
        return self._decoded + (self.first_chunk if self._decoded == 0 else self.chunk)

    def push(self, codes: Sequence[int]) -> np.ndarray:
        """Adds frames; returns the samples that became final (often none)."""
        if self._finished:
            raise RuntimeError("this stream is finished")
        size = self.model.shape.codebook_size
        for code in codes:
            if not 0 <= int(code) < size:
                raise ValueError(f"a NeuCodec code is in [0, {size}), got {code}")
        self._codes.extend(int(c) for c in codes)
        out = []
        while len(self._codes) >= self._chunk_end() + self.lookahead:
            out.append(self._decode_chunk(self._chunk_end()))
        return _concat(out)

    def finish(self) -> np.ndarray:
        """Decodes what is left with the context there is; returns the last samples."""
        if self._finished:
            raise RuntimeError("this stream is finished")
        self._finished = True
        out = []
        while self._decoded < len(self._codes):
            out.append(self._decode_chunk(min(self._chunk_end(), len(self._codes))))
        out.append(self._ola.finish())
        return _concat(out)

    @torch.inference_mode()
    def _decode_chunk(self, end: int) -> np.ndarray:
        start = self._decoded
        first = max(0, start - self.lookback)
        last = min(len(self._codes), end + self.lookahead)
        codes = torch.tensor([self._codes[first:last]], dtype=torch.int64)
        spectra = self.model.spectra(codes)[:, :, start - first : end - first]
        frames = self.model.frames_to_time(spectra)[0].numpy()
        self.windows += 1
        self.window_frames += last - first
        self._decoded = end
        return self._ola.push(frames)


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)


class _EngineStream:
    """A stream as the decode engine holds it: the decoder, where its audio stands,
    and the samples a resumed stream already relayed (dropped, not sent again)."""

    __slots__ = ("decoder", "emitted", "resume_from_sample")

    def __init__(self, decoder: StreamingNeuCodec, resume_from_sample: int) -> None:
        self.decoder = decoder
        self.emitted = 0
        self.resume_from_sample = resume_from_sample


class NeuCodecStreams:
    """StreamingNeuCodec behind the interface the decode engine drives (the SNAC
    decoder's: new_stream, decode, flush), one stream per forward.

    A resume starts again from frame 0 (the token server resends every frame: a
    window's spectra depend on its context, so only the same windows give the same
    bits) and drops the samples before `resume_from_sample`. Windows are decoded when
    a chunk's lookahead is in, so most pushes cost nothing and one in a chunk costs a
    window: calibration therefore steps a chunk of frames at a time
    (`calibration_frames`) and counts the time per frame."""

    codes_per_frame = 1

    def __init__(self, model: NeuCodecDecoder, chunk: int = DEFAULT_CHUNK, lookback: int = DEFAULT_LOOKBACK,
                 lookahead: int = DEFAULT_LOOKAHEAD, first_chunk: int = DEFAULT_FIRST_CHUNK) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.precision = "fp32"
        self.codebook_size = model.shape.codebook_size
        self.sample_rate = model.shape.sample_rate
        self.frame_seconds = model.shape.hop / model.shape.sample_rate
        self.calibration_frames = chunk
        self._grid = dict(chunk=chunk, lookback=lookback, lookahead=lookahead, first_chunk=first_chunk)
        self.last_batch_sizes: list[int] = []

    @staticmethod
    def check_start(first_frame_index: int, resume_from_sample: int, seed: int) -> None:
        """ValueError, saying which, unless a stream can start there."""
        if first_frame_index != 0:
            raise ValueError(f"a NeuCodec stream starts at frame 0 (a resume resends every frame), "
                             f"not {first_frame_index}")
        if not 0 <= resume_from_sample <= MAX_RESUME_SAMPLE:
            raise ValueError(f"resume_from_sample {resume_from_sample} is outside 0..{MAX_RESUME_SAMPLE}")
        if not 0 <= seed < 2**64:
            raise ValueError(f"seed {seed} is outside 0..2^64-1")

    def new_stream(self, first_frame_index: int = 0, resume_from_sample: int = 0, deterministic: bool = False,
                   seed: int = 0) -> _EngineStream:
        """NeuCodec has no noise, so `deterministic` and `seed` change nothing."""
        self.check_start(first_frame_index, resume_from_sample, seed)
        return _EngineStream(StreamingNeuCodec(self.model, **self._grid), resume_from_sample)

    def decode(self, work: list[tuple[_EngineStream, np.ndarray]], max_batch: int = 1) -> list:
        """Each stream's (n, 1) frames in; its new audio out (a Chunk, or None)."""
        self.last_batch_sizes = []
        chunks = []
        for state, frames in work:
            windows = state.decoder.windows
            samples = state.decoder.push(np.asarray(frames).reshape(-1).tolist())
            self.last_batch_sizes += [1] * (state.decoder.windows - windows)  # a forward a window
            chunks.append(self._chunk(state, samples))
        return chunks

    def flush(self, state: _EngineStream):
        return self._chunk(state, state.decoder.finish())

    def warm_up(self, frames: int = 40) -> None:
        state = self.new_stream()
        self.decode([(state, np.zeros((frames, 1), dtype=np.int64))])
        self.flush(state)

    def _chunk(self, state: _EngineStream, samples: np.ndarray) -> Chunk | None:
        start = state.emitted
        state.emitted += samples.size
        skip = max(0, min(samples.size, state.resume_from_sample - start))
        if skip == samples.size:
            return None
        return Chunk(start + skip, samples[skip:])
