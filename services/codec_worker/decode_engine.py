"""The decode engine: all torch work of a worker in one dedicated thread.

Decoding on the asyncio loop would stall every other stream's network I/O for the
length of a step, and torch gains nothing from several Python threads sharing its
intra-op pool. So the gRPC handlers only hand frames over (under a lock) and await
PCM on an asyncio queue; this thread takes whatever frames are pending across all
streams and decodes them in one step, streams of the same shape in one forward.

Cross-stream batching may wait a little (`batch_wait_ms`) for more streams to have
frames ready, but never longer than that, and not at all when every open stream is
already in the step. It pays even on CPU, measured on 2 cores (docs/benchmarks.md):
a step of one frame is bound by reading the weights, not by arithmetic, so sharing
forwards more than doubles throughput at 8 streams (1.8-2.5 -> 4-6 s of audio per
second across runs), and a 5 ms wait for company adds another ~10% at 4-8 streams
(median of paired runs; single runs vary by +-15% on this shared machine).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Union

import numpy as np
import torch

from services.codec_worker.streaming_decoder import StreamingSnacDecoder, StreamState, check_stream_start

log = logging.getLogger(__name__)

# A failover resend or a burst can leave many frames pending; bounding a step keeps
# its latency and memory predictable and lets streams with backlogs batch together.
MAX_FRAMES_PER_STEP = 16


@dataclass(frozen=True)
class Audio:
    """int16 little-endian PCM from absolute sample `sample_offset`."""

    sample_offset: int
    pcm: bytes

    @property
    def samples(self) -> int:
        return len(self.pcm) // 2


@dataclass(frozen=True)
class End:
    """The stream's tail was flushed; nothing follows."""


@dataclass(frozen=True)
class Failed:
    """The stream ended in error; nothing follows. `rejected` when the caller sent
    something the stream cannot take, else the engine failed."""

    message: str
    rejected: bool = False


Output = Union[Audio, End, Failed]


def to_pcm16(samples: np.ndarray) -> bytes:
    return np.clip(np.rint(samples * 32767.0), -32768, 32767).astype("<i2").tobytes()


class EngineStream:
    """One stream's handle. Its methods are called from the event loop."""

    def __init__(self, engine: DecodeEngine, loop: asyncio.AbstractEventLoop, state_args: dict) -> None:
        self._engine = engine
        self._loop = loop
        self._state_args = state_args
        self._outputs: asyncio.Queue[Output] = asyncio.Queue()
        # Guarded by the engine's lock:
        self._pending: list[np.ndarray] = []
        self._finishing = False
        self._cancelled = False
        # Engine thread only:
        self.state: StreamState | None = None

    def submit(self, frames: np.ndarray) -> None:
        """Queues validated (n, 7) frames, consecutive with those before."""
        with self._engine._cond:
            if self._finishing or self._cancelled:
                raise RuntimeError("stream already finished")
            self._pending.append(frames)
            self._engine._cond.notify()

    def finish(self) -> None:
        """The caller half-closed: decode what is pending, then flush the tail."""
        with self._engine._cond:
            self._finishing = True
            self._engine._cond.notify()

    def cancel(self) -> None:
        """Drops the stream and its decoder state; no more output."""
        with self._engine._cond:
            self._cancelled = True
            self._pending.clear()
            self._engine._cond.notify()

    def reject(self, message: str) -> None:
        """Ends the stream for a caller error, after the audio already queued."""
        self.cancel()
        self._outputs.put_nowait(Failed(message, rejected=True))

    async def get(self) -> Output:
        return await self._outputs.get()

    # Engine thread side.

    def _ready(self) -> bool:
        return bool(self._pending) or self._finishing or self._cancelled

    def _take(self, limit: int) -> np.ndarray | None:
        if not self._pending:
            return None
        frames = self._pending[0] if len(self._pending) == 1 else np.concatenate(self._pending)
        taken, rest = frames[:limit], frames[limit:]
        self._pending = [rest] if len(rest) else []
        return taken

    def _deliver(self, item: Output) -> None:
        try:
            self._loop.call_soon_threadsafe(self._outputs.put_nowait, item)
        except RuntimeError:
            pass  # the loop is closed: nobody is listening any more


@dataclass
class EngineStats:
    steps: int = 0
    forwards: int = 0
    frames: int = 0
    streams_stepped: int = 0


class DecodeEngine:
    def __init__(
        self,
        decoder: StreamingSnacDecoder,
        max_batch: int = 16,
        batch_wait_ms: float = 0.0,
        threads: int | None = None,  # most torch threads a step may use; None: torch's default
        max_frames_per_step: int = MAX_FRAMES_PER_STEP,
        on_forward: Callable[[int], None] = lambda streams: None,  # streams in each forward, for metrics
    ) -> None:
        self.decoder = decoder
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_ms / 1000.0
        self.threads = threads or torch.get_num_threads()
        self.max_frames_per_step = max_frames_per_step
        self.on_forward = on_forward
        self.stats = EngineStats()
        self._cond = threading.Condition()
        self._streams: set[EngineStream] = set()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("engine already started")
        self._thread = threading.Thread(target=self._run, name="codec-decode", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ends the thread; streams still open get Failed."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    async def aclose(self) -> None:
        await asyncio.to_thread(self.stop)

    def open_stream(
        self, first_frame_index: int = 0, resume_from_sample: int = 0, deterministic: bool = False, seed: int = 0
    ) -> EngineStream:
        """Must be called on the event loop that will await the stream's output.
        ValueError when the decoder cannot start a stream there."""
        check_stream_start(first_frame_index, resume_from_sample, seed)
        stream = EngineStream(
            self,
            asyncio.get_running_loop(),
            dict(
                first_frame_index=first_frame_index,
                resume_from_sample=resume_from_sample,
                deterministic=deterministic,
                seed=seed,
            ),
        )
        with self._cond:
            if self._stopping:
                raise RuntimeError("decode engine is stopped")
            self._streams.add(stream)
        return stream

    @property
    def open_streams(self) -> int:
        """Streams holding decoder state (cancelled ones leave at the next step)."""
        with self._cond:
            return len(self._streams)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not any(s._ready() for s in self._streams):
                    self._cond.wait()
                if self._stopping:
                    break
                self._wait_for_company()
                work = self._take_work()
            self._step(*work)
        torch.set_num_threads(self.threads)  # the pool is process-wide: not left at a step's count
        with self._cond:
            left, self._streams = list(self._streams), set()
        for stream in left:
            stream._deliver(Failed("codec worker is shutting down"))

    def _wait_for_company(self) -> None:
        """Bounded wait for more streams to have frames, so they share a forward."""
        if self.batch_wait_s <= 0:
            return
        deadline = time.monotonic() + self.batch_wait_s
        while not self._stopping:
            live = [s for s in self._streams if not s._cancelled]
            ready = sum(1 for s in live if s._ready())
            remaining = deadline - time.monotonic()
            if ready >= min(self.max_batch, len(live)) or remaining <= 0:
                return
            self._cond.wait(remaining)

    def _take_work(self) -> tuple[list[tuple[EngineStream, np.ndarray]], list[EngineStream]]:
        decode: list[tuple[EngineStream, np.ndarray]] = []
        flush: list[EngineStream] = []
        for stream in list(self._streams):
            if stream._cancelled:
                self._streams.discard(stream)
                stream.state = None  # its caches go now, not when the handler lets go
                continue
            frames = stream._take(self.max_frames_per_step)
            if frames is not None:
                decode.append((stream, frames))
            if stream._finishing and not stream._pending:
                flush.append(stream)
                self._streams.discard(stream)
        return decode, flush

    def _step(self, decode: list[tuple[EngineStream, np.ndarray]], flush: list[EngineStream]) -> None:
        self.stats.steps += 1
        if self.decoder.device.type == "cpu":
            # A frame of one stream is too little work to split: its ops are small
            # and a second thread only adds sync (1 stream ran at 2.2x real time on
            # 2 threads, 3.2x on 1). Bigger steps do gain, so threads follow the work.
            work = sum(len(f) for _, f in decode) or 1
            torch.set_num_threads(min(self.threads, work))
        failed: set[EngineStream] = set()
        if decode:
            for stream, _ in decode:
                if stream.state is None:
                    stream.state = self.decoder.new_stream(**stream._state_args)
            try:
                chunks = self.decoder.decode([(s.state, f) for s, f in decode], self.max_batch)
            except Exception as err:  # one bad step must not take the worker down
                log.exception("decode step failed for %d streams", len(decode))
                chunks = [None] * len(decode)
                failed = {s for s, _ in decode}
                self._fail(failed, f"decode failed: {err}")
            for streams in self.decoder.last_batch_sizes:
                self.on_forward(streams)
            self.stats.forwards += len(self.decoder.last_batch_sizes)
            self.stats.streams_stepped += len(decode)
            self.stats.frames += sum(len(f) for _, f in decode)
            for (stream, _), chunk in zip(decode, chunks):
                if chunk is not None:
                    stream._deliver(Audio(chunk.sample_offset, to_pcm16(chunk.samples)))
        for stream in flush:
            if stream in failed:
                continue
            try:
                chunk = self.decoder.flush(stream.state) if stream.state is not None else None
            except Exception as err:
                log.exception("flush failed")
                self._fail({stream}, f"flush failed: {err}")
                continue
            if chunk is not None:
                stream._deliver(Audio(chunk.sample_offset, to_pcm16(chunk.samples)))
            stream._deliver(End())
            stream.state = None

    def _fail(self, streams: set[EngineStream], message: str) -> None:
        with self._cond:
            self._streams.difference_update(streams)
        for stream in streams:
            stream.state = None
            stream._deliver(Failed(message))
