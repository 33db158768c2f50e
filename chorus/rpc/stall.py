"""A peer that hangs mid-stream is taken for dead before its listener runs dry.

A peer that dies ends its call (UNAVAILABLE) and the stream fails over from the last
sample relayed. A peer that hangs (a stopped or wedged process, a host whose
connections stay up) ends nothing: its call, and the listener with it, waits until
the request's deadline. So each hop that relays audio watches its call: once the peer
owes the stream audio, some must come before the listener's lead is down to
`margin_s`, and never sooner than `floor_s` after the peer began to owe it, so that
the chunk gaps of a slow but live peer stay under it. A call past that is cancelled
and ends as a dead peer's would, with UNAVAILABLE, so the existing failover takes it.

The token server's relay watches its codec worker with a tighter policy than the
gateway watches the token server, so that a hung codec worker is replaced inside the
token server (which costs three frames' decode) before the gateway would replay the
whole piece elsewhere (which costs regenerating it).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

T = TypeVar("T")

# How often a watch asks again when the peer owes nothing, or may owe more: what it
# owes changes outside the read it waits on (the relay writes frames meanwhile).
_RECHECK_S = 0.25
_END = object()


@dataclass(frozen=True)
class StallPolicy:
    """How long a peer that owes a stream audio may send none."""

    # Never taken for hung sooner than this after it began to owe audio.
    floor_s: float
    # Taken for hung once the listener's lead is down to this, and the floor passed.
    margin_s: float

    def __post_init__(self) -> None:
        if not 0 < self.floor_s <= 3600:
            raise ValueError(f"stall floor must be in (0, 3600] seconds, got {self.floor_s}")
        if not 0 <= self.margin_s <= 3600:
            raise ValueError(f"stall margin must be in [0, 3600] seconds, got {self.margin_s}")

    def hung_at(self, owed_since: float, next_sample_due_at: float | None) -> float:
        """When a peer silent while owing audio since `owed_since` is taken for hung;
        `next_sample_due_at` is when the listener needs the next sample (None: the
        stream has no schedule yet, only the floor holds)."""
        floor = owed_since + self.floor_s
        return floor if next_sample_due_at is None else max(floor, next_sample_due_at - self.margin_s)


# The gateway watching a token server: its margin must stay below the token servers'
# --pace-lead (2 s), where a stream far enough ahead sits steps out without audio.
GATEWAY_STALL = StallPolicy(floor_s=3.0, margin_s=0.5)
# A token server watching a codec worker: at least a second earlier than the gateway at either
# bound, which leaves the relay's resume on another worker time to bring audio.
CODEC_STALL = StallPolicy(floor_s=1.5, margin_s=1.5)


async def watched(
    responses: AsyncIterator[T], hung_at: Callable[[], float | None], peer: str
) -> AsyncIterator[T]:
    """The responses of a call; UNAVAILABLE (a grpc.aio.AioRpcError, as a dead peer's
    call ends) once the next one has not come by `hung_at()` (time.monotonic(); None
    while the peer owes nothing). It is asked again while the read waits, since what
    the peer owes changes meanwhile. Time this process itself stood still (stopped,
    starved of CPU, its event loop blocked) is not held against the peer: the waits
    it overslept are added to the deadline, so a process that resumes does not take
    every peer it was waiting on for hung at once. Waiting does not cancel the read
    (cancelling a gRPC read cancels its call); a stall does, and the caller cancels
    the call, as it does for any failure."""
    iterator = aiter(responses)
    while True:
        read = asyncio.ensure_future(anext(iterator, _END))
        overslept = 0.0  # while waiting for this response
        try:
            while not read.done():
                # The read has its chance before every verdict, a past deadline's too.
                deadline, now = hung_at(), time.monotonic()
                wait = _RECHECK_S if deadline is None else min(_RECHECK_S, max(0.0, deadline + overslept - now))
                await asyncio.wait({read}, timeout=wait)
                if read.done():
                    break
                after = time.monotonic()
                overslept += max(0.0, after - now - wait)
                deadline = hung_at()
                if deadline is not None and after >= deadline + overslept:
                    raise grpc.aio.AioRpcError(
                        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                        f"{peer} sent no audio for longer than the stream's lead allows; taken for hung",
                    )
        finally:
            if not read.done():
                read.cancel()
        response = read.result()
        if response is _END:
            return
        yield response
