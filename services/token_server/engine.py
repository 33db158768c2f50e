"""Continuous batching over llama.cpp sequence slots.

One thread owns the llama context and runs the step loop, the way llama-server's
slots and SGLang's scheduler do: every step carries one token for each generating
slot, then fills the rest of the `n_batch` budget with chunked prefill of admitted
prompts. Requests join at the next step and leave (their KV cleared) the moment
they finish or are cancelled. Nothing here knows about gRPC: the RPC layer submits
requests and awaits their events on the asyncio loop.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from chorus import orpheus
from services.token_server.llama_backend import LlamaBackbone, TokenBatch
from services.token_server.sampler import EOS_COLUMN, SamplingParams, SequenceSampler, gather_legal_logits, sample

log = logging.getLogger(__name__)


class QueueFullError(Exception):
    """The engine holds as many requests as its slots and queue allow."""


class PromptTooLongError(ValueError):
    """The prompt and its token budget do not fit a slot's context."""


@dataclass(frozen=True)
class Frame:
    """A complete 7-code frame."""

    index: int
    codes: tuple[int, ...]


@dataclass
class RequestStats:
    """Monotonic timestamps (time.monotonic) and counts of one request."""

    submitted_at: float
    prompt_tokens: int = 0
    admitted_at: float | None = None
    first_token_at: float | None = None
    first_frame_at: float | None = None
    # When the frames the codec needs for its first samples were complete.
    decodable_at: float | None = None
    finished_at: float | None = None
    generated_tokens: int = 0
    frames: int = 0

    @property
    def queue_wait_s(self) -> float:
        return (self.admitted_at or self.submitted_at) - self.submitted_at


@dataclass(frozen=True)
class Finished:
    """Last event of a request that ran to its end."""

    reason: str  # "end_of_speech" | "max_tokens"
    stats: RequestStats


@dataclass(frozen=True)
class Failed:
    """Last event of a request the engine could not finish."""

    message: str


EngineEvent = Frame | Finished | Failed


@dataclass
class GenerationRequest:
    request_id: str
    prompt: list[int]
    sampling: SamplingParams
    max_tokens: int
    # Generate exactly max_tokens (benchmarks: a fixed batch size for the whole run).
    ignore_end_of_speech: bool = False


class RequestHandle:
    """The asyncio side of a request: its event stream, and a way to cancel it."""

    def __init__(self, engine: "Engine", request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> None:
        self.request = request
        self.stats = RequestStats(submitted_at=time.monotonic(), prompt_tokens=len(request.prompt))
        self._engine = engine
        self._loop = loop
        self._events: asyncio.Queue[EngineEvent] = asyncio.Queue()
        self._done = False

    def _deliver(self, event: EngineEvent) -> None:
        """Called from the engine thread."""
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:
            pass  # the loop is gone; nobody is listening

    async def events(self):
        """Frames in order, then one Finished or Failed."""
        while not self._done:
            event = await self._events.get()
            if isinstance(event, (Finished, Failed)):
                self._done = True
            yield event

    def cancel(self) -> None:
        """Frees the slot and KV before the engine's next step. Idempotent."""
        if not self._done:
            self._done = True
            self._engine._post(("cancel", self))


@dataclass
class _Active:
    handle: RequestHandle
    sampler: SequenceSampler
    prompt: np.ndarray
    max_tokens: int
    seq: int = -1
    prefilled: int = 0
    next_pos: int = 0
    last_token: int = -1
    generated: int = 0
    frame: list[int] = field(default_factory=list)
    frame_index: int = 0

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.prompt)


class Engine:
    """N slots over one llama context; a dedicated thread runs the step loop."""

    def __init__(
        self,
        backbone: LlamaBackbone,
        slots: int,
        n_batch: int,
        queue_size: int,
        ctx_per_slot: int,
        on_decode: Callable[[int], None] | None = None,
    ) -> None:
        self.backbone = backbone
        self.n_slots = slots
        self.n_batch = n_batch
        self.queue_size = queue_size
        self.ctx_per_slot = ctx_per_slot
        self._slots: list[_Active | None] = [None] * slots
        self._waiting: collections.deque[_Active] = collections.deque()
        self._inbox: collections.deque = collections.deque()
        self._wake = threading.Condition()
        self._in_system = 0  # admitted + waiting, guarded by _wake
        self._batch = TokenBatch(n_batch, slots)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0
        # Wall time inside llama_decode vs. the whole loop: the Python around it is the rest.
        self.decode_seconds = 0.0
        self.busy_seconds = 0.0
        # Called on the engine thread with each llama_decode's token count (metrics).
        self._on_decode = on_decode

    # -- asyncio side -------------------------------------------------------

    def submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None = None) -> RequestHandle:
        """Queues a request; raises QueueFullError or PromptTooLongError at once."""
        needed = len(request.prompt) + request.max_tokens + 1
        if needed > self.ctx_per_slot:
            raise PromptTooLongError(
                f"prompt of {len(request.prompt)} tokens plus a budget of {request.max_tokens} tokens "
                f"needs {needed} positions, more than a slot's context of {self.ctx_per_slot}; "
                "send shorter text (the gateway splits long text into sentences)"
            )
        handle = RequestHandle(self, request, loop or asyncio.get_running_loop())
        with self._wake:
            if self._in_system >= self.n_slots + self.queue_size:
                raise QueueFullError(
                    f"all {self.n_slots} slots are busy and {self.queue_size} requests are already waiting; "
                    "retry later or on another token server"
                )
            self._in_system += 1
            self._inbox.append(("submit", handle))
            self._wake.notify()
        return handle

    def run_in_engine(self, fn: Callable[["Engine"], object]) -> concurrent.futures.Future:
        """Runs fn(engine) on the engine thread between two steps (for inspection)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._post(("call", fn, future))
        return future

    def load(self) -> tuple[int, int]:
        """(busy slots, waiting requests); read without stopping the loop."""
        busy = sum(1 for s in self._slots if s is not None)
        with self._wake:
            in_system = self._in_system
        return busy, max(0, in_system - busy)

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="token-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ends the loop; requests still inside get Failed."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
        self._batch.free()

    def _post(self, item: tuple) -> None:
        with self._wake:
            self._inbox.append(item)
            self._wake.notify()

    # -- engine thread ------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._wake:
                    while not self._inbox and not self._stopping and not self._has_work():
                        self._wake.wait()
                    if self._stopping:
                        break
                    inbox = list(self._inbox)
                    self._inbox.clear()
                for item in inbox:
                    self._handle(item)
                self._admit()
                if self._has_work():
                    started = time.perf_counter()
                    self._step()
                    self.busy_seconds += time.perf_counter() - started
        except Exception as exc:  # a llama.cpp failure: fail everything, loudly
            log.exception("engine loop failed")
            self._fail_all(f"token engine failed: {exc}")
            raise
        self._fail_all("token server is shutting down")

    def _has_work(self) -> bool:
        return any(s is not None for s in self._slots) or bool(self._waiting)

    def _handle(self, item: tuple) -> None:
        kind = item[0]
        if kind == "submit":
            handle: RequestHandle = item[1]
            req = handle.request
            self._waiting.append(
                _Active(handle, SequenceSampler(req.sampling), np.asarray(req.prompt, dtype=np.int32), req.max_tokens)
            )
        elif kind == "cancel":
            self._cancel(item[1])
        elif kind == "call":
            _, fn, future = item
            try:
                future.set_result(fn(self))
            except Exception as exc:
                future.set_exception(exc)

    def _cancel(self, handle: RequestHandle) -> None:
        for act in self._waiting:
            if act.handle is handle:
                self._waiting.remove(act)
                self._leave()
                return
        for seq, act in enumerate(self._slots):
            if act is not None and act.handle is handle:
                self._release(seq)
                return
        # Already finished: nothing holds resources.

    def _leave(self) -> None:
        with self._wake:
            self._in_system -= 1

    def _release(self, seq: int) -> None:
        self.backbone.clear_sequence(seq)
        self._slots[seq] = None
        self._leave()

    def _admit(self) -> None:
        now = time.monotonic()
        for seq in range(self.n_slots):
            if not self._waiting:
                return
            if self._slots[seq] is None:
                act = self._waiting.popleft()
                act.seq = seq
                act.handle.stats.admitted_at = now
                self.backbone.clear_sequence(seq)
                self._slots[seq] = act

    def _step(self) -> None:
        """One engine step: a token for every generating slot, then chunked prefill of
        admitted prompts in what is left of the n_batch budget.

        The generating tokens go in one llama_decode and each prefill chunk in its own.
        With a KV stream per sequence llama.cpp splits a mixed batch into ubatches of
        equal tokens per sequence anyway (so the passes over the weights are the same),
        and separate calls keep a prompt's chunking independent of what else runs: a
        1-token piece of a prompt takes another kernel than a longer one, so chunks are
        never shorter than 2 tokens.
        """
        batch = self._batch
        batch.clear()
        generating: list[tuple[_Active, int]] = []
        active = [a for a in self._slots if a is not None]
        for act in active:
            if not act.prefilling:
                generating.append((act, batch.add([act.last_token], act.next_pos, act.seq, True)))
                act.next_pos += 1
        budget = self.n_batch - batch.n_tokens
        if generating:
            self._decode(batch)
            self._sample(generating)
        for act in sorted((a for a in active if a.prefilling), key=lambda a: a.handle.stats.admitted_at):
            remaining = len(act.prompt) - act.prefilled
            take = min(budget, remaining)
            if remaining - take == 1:
                take -= 1  # never leave a 1-token tail
            if take < 2:
                break
            done = take == remaining
            batch.clear()
            index = batch.add(act.prompt[act.prefilled : act.prefilled + take], act.prefilled, act.seq, done)
            act.prefilled += take
            budget -= take
            self._decode(batch)
            if done:
                act.next_pos = len(act.prompt)
                self._sample([(act, index)])
        self.steps += 1

    def _decode(self, batch: TokenBatch) -> None:
        started = time.perf_counter()
        self.backbone.decode(batch)
        self.decode_seconds += time.perf_counter() - started
        if self._on_decode is not None:
            self._on_decode(batch.n_tokens)

    def _sample(self, sampling: list[tuple[_Active, int]]) -> None:
        acts = [a for a, _ in sampling]
        generated = np.array([a.generated for a in acts])
        positions = generated % orpheus.CODES_PER_FRAME
        eos_allowed = (positions == 0) & (generated > 0)
        eos_allowed &= np.array([not a.handle.request.ignore_end_of_speech for a in acts])
        legal = gather_legal_logits([self.backbone.logits_at(i) for _, i in sampling], positions)
        choices = sample(legal, [a.sampler for a in acts], positions, eos_allowed)
        now = time.monotonic()
        for act, position, choice in zip(acts, positions.tolist(), choices.tolist()):
            stats = act.handle.stats
            if stats.first_token_at is None:
                stats.first_token_at = now
            if choice == EOS_COLUMN:
                self._finish(act, "end_of_speech", now)
                continue
            act.sampler.record(position, choice)
            act.last_token = orpheus.AUDIO_TOKEN_BASE + position * orpheus.CODEBOOK_SIZE + choice
            act.generated += 1
            stats.generated_tokens = act.generated
            act.frame.append(choice)
            if len(act.frame) == orpheus.CODES_PER_FRAME:
                if stats.first_frame_at is None:
                    stats.first_frame_at = now
                act.handle._deliver(Frame(act.frame_index, tuple(act.frame)))
                act.frame_index += 1
                stats.frames = act.frame_index
                if act.frame_index == orpheus.DECODER_LOOKAHEAD_FRAMES:
                    stats.decodable_at = now
                act.frame = []
                if act.generated >= act.max_tokens:
                    self._finish(act, "max_tokens", now)

    def _finish(self, act: _Active, reason: str, now: float) -> None:
        act.handle.stats.finished_at = now
        if act.handle.stats.decodable_at is None:  # shorter than the lookahead: the end flushes it
            act.handle.stats.decodable_at = now
        self._release(act.seq)
        act.handle._deliver(Finished(reason, act.handle.stats))

    def _fail_all(self, message: str) -> None:
        for seq, act in enumerate(self._slots):
            if act is not None:
                self._slots[seq] = None
                act.handle._deliver(Failed(message))
        while self._waiting:
            self._waiting.popleft().handle._deliver(Failed(message))
        for item in self._inbox:
            if item[0] == "submit":
                item[1]._deliver(Failed(message))
            elif item[0] == "call":
                item[2].set_exception(RuntimeError(message))
        self._inbox.clear()
