"""What a request is to the token engine, and what it hears back.

After vLLM v1's `vllm/v1/request.py`: a `Sequence` carries its own `SequenceStatus`,
set by the scheduler where it moves the sequence, so that where a request stands is
read from the request and not inferred from which queue or slot happens to hold it.
Nothing here runs anything: the scheduler decides and the engine executes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np

from chorus.realtime.playback import PlaybackClock
from chorus.speech import orpheus
from services.token_server.sampler import SamplingParams, SequenceSampler


class QueueFullError(Exception):
    """The engine holds as many requests as its capacity and queue allow."""


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
    paced_steps: int = 0  # steps this request sat out, ahead of its listener

    @property
    def queue_wait_s(self) -> float:
        return (self.admitted_at or self.submitted_at) - self.submitted_at


@dataclass(frozen=True)
class Finished:
    """Last event of a request that ran to its end."""

    reason: str  # "end_of_speech" | "max_tokens"
    stats: RequestStats


@dataclass(frozen=True)
class GenerationFailed:
    """Last event of a request the engine could not finish."""

    message: str


EngineEvent = Frame | Finished | GenerationFailed


@dataclass
class GenerationRequest:
    request_id: str
    prompt: list[int]
    sampling: SamplingParams
    # The budget the engine obeys: generation stops after this many tokens (whole frames).
    token_budget: int
    # Generate exactly token_budget (benchmarks: a fixed batch size for the whole run).
    ignore_end_of_speech: bool = False
    # The listener's schedule; the RPC layer advances it as audio is relayed.
    playback: PlaybackClock | None = None
    # Holds a codec stream while it runs (audio mode); codes-only requests do not.
    needs_codec: bool = True


class SequenceStatus(enum.IntEnum):
    WAITING = enum.auto()  # in the queue, no slot
    PREFILLING = enum.auto()  # holds a slot, its prompt not all in the KV yet
    RUNNING = enum.auto()  # generating a token this step
    PACED = enum.auto()  # generating, but sitting this step out ahead of its listener
    FINISHED_STOPPED = enum.auto()  # sampled end of speech
    FINISHED_LENGTH_CAPPED = enum.auto()  # reached its token budget
    FINISHED_ABORTED = enum.auto()  # cancelled by its caller
    FINISHED_FAILED = enum.auto()  # the engine could not finish it

    @property
    def finished(self) -> bool:
        return self >= SequenceStatus.FINISHED_STOPPED


# The reason a Finished event gives, for the statuses that end with one.
FINISH_REASONS = {
    SequenceStatus.FINISHED_STOPPED: "end_of_speech",
    SequenceStatus.FINISHED_LENGTH_CAPPED: "max_tokens",
}


@dataclass(eq=False)
class Sequence:
    """One request inside the engine: what the scheduler decides on and advances, and
    what the engine runs. `owner` is the engine's handle for delivering events;
    `clock` is the engine thread's own copy of the listener's schedule (the event loop
    hands it over, engine.RequestHandle.deliver says how)."""

    request_id: str
    prompt: np.ndarray
    sampler: SequenceSampler
    token_budget: int  # generation stops after this many tokens (whole frames)
    ignore_end_of_speech: bool
    clock: PlaybackClock
    submitted_at: float
    needs_codec: bool = True
    owner: object = None
    stats: RequestStats | None = None
    status: SequenceStatus = SequenceStatus.WAITING
    slot: int = -1
    admitted_at: float | None = None
    prefilled: int = 0
    next_pos: int = 0
    last_token: int = -1
    generated: int = 0
    frame: list[int] = field(default_factory=list)
    frames: int = 0  # complete frames delivered
    samples_per_frame: int = orpheus.SAMPLES_PER_FRAME  # its family's

    def __post_init__(self) -> None:
        if self.stats is None:
            self.stats = RequestStats(self.submitted_at, prompt_tokens=len(self.prompt))

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.prompt)

    def lead(self, now: float) -> float | None:
        """Seconds of audio generated beyond what the listener has played; None before
        its first audio (the clock starts there)."""
        return self.clock.lead(now, delivered=self.frames * self.samples_per_frame)


@dataclass(frozen=True)
class SampledToken:
    """What the engine sampled for a sequence: `column` is a code of frame position
    `position`, or sampler.EOS_COLUMN; `at` is when it was sampled."""

    seq: Sequence
    position: int
    column: int
    at: float


@dataclass(frozen=True)
class SequenceOutput:
    """An event for a sequence's handle, from Scheduler.update_from_output. A final
    event comes with the slot it gave up (`freed_slot`), whose KV the engine clears."""

    seq: Sequence
    event: EngineEvent
    freed_slot: int | None = None

    @property
    def final(self) -> bool:
        return not isinstance(self.event, Frame)
