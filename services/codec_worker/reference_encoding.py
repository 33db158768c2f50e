"""Reference recordings to codes, beside the decode streams.

Cloning a voice encodes its reference once; the encoder (Wav2Vec2-BERT plus the
acoustic encoder) takes seconds of compute on a CPU for seconds of audio, so it must
not run on the decode engine's thread, where every stream would stall behind it. It
gets a thread of its own and runs one encode at a time: the decode engine keeps its
schedule, and the cost of a burst of registrations is bounded by the queue, whose
overflow is refused at once rather than left to time out. Inputs are checked here as
well as at the gateway, because this service is also called directly.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging

import numpy as np

from chorus.speech.limits import reference_problem

log = logging.getLogger(__name__)

# Encodes waiting behind the running one before more are refused.
MAX_WAITING = 4


class NoEncoder(Exception):
    """This worker's model cannot encode."""


class BadReference(ValueError):
    """The recording cannot be encoded; the message says why."""


class EncoderBusy(Exception):
    """Too many encodes are waiting."""


class ReferenceEncoder:
    def __init__(self, encoder, max_waiting: int = MAX_WAITING) -> None:
        self._encoder = encoder  # .encode(float32 16 kHz samples) -> int32 codes; None: cannot encode
        self._max_waiting = max_waiting
        self._pending = 0  # running + waiting
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="reference-encoder")

    @property
    def available(self) -> bool:
        return self._encoder is not None

    async def encode(self, samples: np.ndarray, sample_rate: int) -> np.ndarray:
        """The recording's codes; NoEncoder, BadReference or EncoderBusy otherwise."""
        if self._encoder is None:
            raise NoEncoder("this codec worker's model has no encoder (its directory has no encoder.json), so it "
                            "cannot clone voices; point a worker at a NeuCodec directory with its encoder")
        problem = reference_problem(samples.size, sample_rate)
        if problem is not None:
            raise BadReference(problem)
        samples = np.asarray(samples, dtype=np.float32)
        if not np.isfinite(samples).all():
            raise BadReference("the reference holds samples that are not numbers (NaN or infinity)")
        if np.abs(samples).max() > 1.0:
            raise BadReference("the reference's samples must lie within [-1, 1]")
        if self._pending > self._max_waiting:
            raise EncoderBusy(f"{self._pending} reference encodes are already running or waiting here; retry "
                              "shortly or on another codec worker")
        self._pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._thread, self._encode, samples)
        finally:
            self._pending -= 1

    def _encode(self, samples: np.ndarray) -> np.ndarray:
        # Subnormal samples are flushed to zero: they carry nothing audible, and on some
        # CPUs they slow every convolution they pass through by orders of magnitude.
        samples = np.where(np.abs(samples) < np.finfo(np.float32).tiny, np.float32(0), samples)
        try:
            return np.asarray(self._encoder.encode(samples), dtype=np.int32)
        except ValueError as err:
            raise BadReference(str(err)) from err

    def close(self) -> None:
        self._thread.shutdown(wait=True, cancel_futures=True)
