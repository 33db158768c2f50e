"""A listener's playback clock for one stream, kept wherever the stream's urgency matters.

A stream is held real time when no sample reaches its listener after the moment the
listener needs it. The listener's schedule: playback starts `start_buffer_s` after the
first audio arrives and then runs at the sample rate, so sample s is needed at
start + s / rate. If a sample is late, the listener's player waits for it (an
underrun) and playback resumes when it arrives: the schedule shifts by the stall,
which is what a real player does and what a listener hears as one gap.

The same clock serves four places: the gateway counts underruns and stall seconds
against it (what the client lives with); the token server paces streams that are far
ahead and knows which are behind; the codec worker decodes the least-ahead streams
first; `chorus bench` replays chunk arrival times through it. Each keeps its own copy
on its own clock, started at the audio it sends (transport between the hops is a few
ms), and passes the schedule on with `due_in` when it opens the next hop's stream.

`lead` is how long the stream could go without new audio before its listener
stalls: once playback runs, audio delivered minus audio played. A stream whose clock has not started (no audio
yet) has no lead: it is the most urgent of all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from chorus.proto.tts.v1 import common_pb2

DEFAULT_START_BUFFER_S = 0.15
# Audio this close to its time is on time: the rounding of the clock's arithmetic.
_ON_TIME_S = 1e-9


@dataclass(frozen=True)
class Stall:
    """One underrun: the listener waited `seconds` for audio that was due at `due_at`."""

    due_at: float
    seconds: float


class PlaybackClock:
    """Times are seconds on the caller's monotonic clock; audio is counted in samples."""

    __slots__ = ("sample_rate", "start_buffer_s", "start_at", "delivered", "underruns", "stall_seconds")

    def __init__(self, sample_rate: int, start_buffer_s: float = DEFAULT_START_BUFFER_S) -> None:
        if sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, got {sample_rate}")
        if not 0.0 <= start_buffer_s <= 60.0:
            raise ValueError(f"start_buffer_s must be in [0, 60], got {start_buffer_s}")
        self.sample_rate = sample_rate
        self.start_buffer_s = start_buffer_s
        # When sample 0 plays; None until the first audio (or a known schedule) starts it.
        self.start_at: float | None = None
        self.delivered = 0
        self.underruns = 0
        self.stall_seconds = 0.0

    @classmethod
    def scheduled(cls, sample_rate: int, first_sample_due_at: float, first_sample: int = 0,
                  start_buffer_s: float = DEFAULT_START_BUFFER_S) -> PlaybackClock:
        """A clock already running: `first_sample` (the first this hop will produce) is
        due at `first_sample_due_at`; the samples before it count as delivered."""
        clock = cls(sample_rate, start_buffer_s)
        clock.start_at = first_sample_due_at - first_sample / sample_rate
        clock.delivered = first_sample
        return clock

    @classmethod
    def from_wire(cls, playback: common_pb2.PlaybackClock, sample_rate: int, now: float,
                  first_sample: int = 0) -> PlaybackClock:
        """The schedule a hop received (tts.v1.PlaybackClock) on this hop's clock: running
        already when the sender knew when a sample is due (`first_sample`, the first this
        hop produces, is due `first_sample_due_in_s` after `now`), else starting at the
        first audio plus the start buffer. ValueError names the field out of range."""
        start_buffer = playback.start_buffer_s or DEFAULT_START_BUFFER_S
        if not 0.0 <= start_buffer <= 60.0:
            raise ValueError(f"playback.start_buffer_s is {start_buffer:g}; it must be in [0, 60]")
        if not playback.HasField("first_sample_due_in_s"):
            return cls(sample_rate, start_buffer)
        due_in = playback.first_sample_due_in_s
        if not -3600.0 <= due_in <= 3600.0:
            raise ValueError(f"playback.first_sample_due_in_s is {due_in:g}; it must be within an hour of now")
        return cls.scheduled(sample_rate, now + due_in, first_sample=first_sample, start_buffer_s=start_buffer)

    @property
    def started(self) -> bool:
        return self.start_at is not None

    def deliver(self, samples: int, now: float) -> Stall | None:
        """`samples` more samples reached the listener at `now`; returns the stall they
        caused, if they came late."""
        if samples <= 0:
            return None
        if self.start_at is None:
            self.start_at = now + self.start_buffer_s
        stall = None
        due = self.start_at + self.delivered / self.sample_rate
        if now - due > _ON_TIME_S:
            stall = Stall(due, now - due)
            self.underruns += 1
            self.stall_seconds += stall.seconds
            self.start_at += stall.seconds  # the player waited; playback resumes now
        self.delivered += samples
        return stall

    def lead(self, now: float, delivered: int | None = None) -> float | None:
        """Seconds until the listener runs out of the audio delivered (or of `delivered`
        samples, e.g. generated but not yet decoded): once playback runs, audio
        delivered minus audio played. Negative when the listener is already waiting;
        None before the clock starts."""
        if self.start_at is None:
            return None
        count = self.delivered if delivered is None else delivered
        return self.start_at + count / self.sample_rate - now

    def due_in(self, sample: int, now: float) -> float | None:
        """Seconds from `now` until the listener needs `sample`; None before the clock starts."""
        due = self.due_at(sample)
        return None if due is None else due - now

    def due_at(self, sample: int) -> float | None:
        """When (on this clock) the listener needs `sample`; None before the clock starts."""
        if self.start_at is None:
            return None
        return self.start_at + sample / self.sample_rate


def urgency(lead: float | None) -> tuple[int, float]:
    """Sort key, most urgent first: streams without audio yet, then the least lead."""
    return (0, 0.0) if lead is None else (1, lead)
