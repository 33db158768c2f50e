"""A cloned voice's reference recording: opened, checked, and made 16 kHz mono.

Models of the NeuTTS-Air kind clone a voice from a few seconds of speech and its
transcript. The reference is encoded once (NeuCodec's encoder reads 16 kHz mono) and
stored, so what a client uploads is checked here, at the door, where a person can
still fix it: any container and codec FFmpeg opens (WAV, FLAC, MP3, Ogg, ...), with
one error for each way a recording is unusable. Decoding stops as soon as the source
runs past the longest reference, so a long or endless upload costs at most that much
work.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import av
import numpy as np

from chorus.speech.limits import MAX_REFERENCE_SECONDS as MAX_SECONDS
from chorus.speech.limits import MIN_REFERENCE_SECONDS as MIN_SECONDS
from chorus.speech.limits import MAX_REFERENCE_UPLOAD_BYTES as MAX_BYTES
from chorus.speech.limits import REFERENCE_RATE

# Below it the recording lacks the band the encoder reads; upsampled it would still lack it.
MIN_SOURCE_RATE = 16_000
# Above it no recording is real (studio audio tops out at 384 kHz), and a header claiming
# billions of samples a second only makes the resampler allocate for them.
MAX_SOURCE_RATE = 384_000
# Speech is there when enough 50 ms windows are louder than this (dB below full scale).
SPEECH_WINDOW_S = 0.05
SPEECH_DBFS = -40.0
MIN_SPEECH_SECONDS = 0.5


class ReferenceAudioError(ValueError):
    """The upload cannot serve as a reference; the message says what to change."""


@dataclass(frozen=True)
class ReferenceAudio:
    samples: np.ndarray  # float32 mono at REFERENCE_RATE, within [-1, 1]
    source_rate: int
    seconds: float


def read_reference(data: bytes) -> ReferenceAudio:
    """The recording in `data` at REFERENCE_RATE mono, or ReferenceAudioError."""
    if not data:
        raise ReferenceAudioError("the reference audio is empty")
    if len(data) > MAX_BYTES:
        raise ReferenceAudioError(f"the reference audio is {len(data):,} bytes; at most {MAX_BYTES:,} are read "
                                  f"(a reference is {MIN_SECONDS:g}-{MAX_SECONDS:g} s of speech)")
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.FFmpegError, ValueError) as err:
        raise ReferenceAudioError(f"the reference is not audio FFmpeg can open ({err}); send WAV, FLAC, MP3 "
                                  "or Ogg") from err
    with container:
        if not container.streams.audio:
            raise ReferenceAudioError("the reference file holds no audio stream")
        stream = container.streams.audio[0]
        source_rate = stream.codec_context.sample_rate or stream.sample_rate
        if source_rate < MIN_SOURCE_RATE:
            raise ReferenceAudioError(f"the reference is sampled at {source_rate} Hz; it must be at least "
                                      f"{MIN_SOURCE_RATE} Hz (record or export it at 16 kHz or more)")
        if source_rate > MAX_SOURCE_RATE:
            raise ReferenceAudioError(f"the reference claims {source_rate} samples a second; at most "
                                      f"{MAX_SOURCE_RATE} Hz is read (export it at 16-48 kHz)")
        samples = _decode(container, stream, source_rate)
    seconds = samples.size / REFERENCE_RATE
    if seconds < MIN_SECONDS:
        raise ReferenceAudioError(f"the reference is {seconds:.2f} s long; it must be at least {MIN_SECONDS:g} s "
                                  "of speech")
    _check_speech(samples)
    return ReferenceAudio(samples=samples, source_rate=source_rate, seconds=seconds)


def _decode(container, stream, source_rate: int) -> np.ndarray:
    resampler = av.AudioResampler(format="flt", layout="mono", rate=REFERENCE_RATE)
    limit = int(MAX_SECONDS * source_rate)
    parts: list[np.ndarray] = []
    read = 0
    try:
        for frame in container.decode(stream):
            raw = frame.to_ndarray()
            if raw.dtype.kind == "f" and not np.isfinite(raw).all():
                raise ReferenceAudioError("the reference holds samples that are not numbers (NaN or infinity)")
            read += frame.samples
            if read > limit:
                raise ReferenceAudioError(f"the reference is longer than {MAX_SECONDS:g} s; send "
                                          f"{MIN_SECONDS:g}-{MAX_SECONDS:g} s of speech")
            parts += [r.to_ndarray().reshape(-1) for r in resampler.resample(frame)]
        parts += [r.to_ndarray().reshape(-1) for r in resampler.resample(None)]
    except av.FFmpegError as err:
        raise ReferenceAudioError(f"the reference audio could not be decoded ({err})") from err
    samples = np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)
    return np.clip(samples, -1.0, 1.0)


def _check_speech(samples: np.ndarray) -> None:
    window = int(SPEECH_WINDOW_S * REFERENCE_RATE)
    n = samples.size // window
    rms = np.sqrt(np.mean(np.square(samples[: n * window].reshape(n, window), dtype=np.float64), axis=1))
    loud = int(np.count_nonzero(rms >= 10 ** (SPEECH_DBFS / 20)))
    if loud * SPEECH_WINDOW_S < MIN_SPEECH_SECONDS:
        raise ReferenceAudioError(
            f"the reference is silent or nearly so: {loud * SPEECH_WINDOW_S:.2f} s of it is louder than "
            f"{SPEECH_DBFS:g} dBFS, and a voice needs at least {MIN_SPEECH_SECONDS:g} s of speech"
        )
