"""Ends a Decode stream whose client has gone quiet, so idle streams cannot fill the cap.

A stream is idle when its client neither sends (DecodeStart, frames, half-close) nor
reads (each response the worker manages to write counts: gRPC flow control holds
a write until the client reads). Before DecodeStart a short timeout applies: a
token server sends it at once. After that a longer one: frames come every 85 ms of
audio at real time, so tens of seconds of silence mean a stuck or hostile client.

Waiting only on reads would not do: a client that sends frames and never reads
leaves the handler waiting in a write, where nothing it awaits will ever time out.
So the watch cancels the handler's task. Where the handler was waiting on its
client or its engine it reports DEADLINE_EXCEEDED with `expired`; where it was stuck
in a write, gRPC closes it and no status can reach a client that reads nothing, but
its slot and decoder state are freed either way.
"""

from __future__ import annotations

import asyncio


class IdleWatch:
    """Created in the handler's task; `touch()` on every sign of life; `close()` at the end."""

    def __init__(self, start_timeout_s: float, idle_timeout_s: float) -> None:
        self._start_timeout_s = start_timeout_s
        self._idle_timeout_s = idle_timeout_s
        self._loop = asyncio.get_running_loop()
        self._handler = asyncio.current_task()
        self._last = self._loop.time()
        self._started = False
        # Why the stream was ended, once it was.
        self.expired: str | None = None
        self._watch = self._loop.create_task(self._run(), name="codec-idle-watch")

    def started(self) -> None:
        """DecodeStart came: from now on the idle timeout applies."""
        self._started = True
        self.touch()

    def touch(self) -> None:
        self._last = self._loop.time()

    def close(self) -> None:
        self._watch.cancel()

    async def _run(self) -> None:
        while True:
            limit = self._idle_timeout_s if self._started else self._start_timeout_s
            remaining = self._last + limit - self._loop.time()
            if remaining <= 0:
                break
            # Before DecodeStart, wake at least once an idle timeout: a start arriving
            # mid-sleep switches to the idle limit, which must then hold from that start
            # (a 10 s start timeout once let a 0.5 s idle timeout end a stream at 10 s).
            await asyncio.sleep(remaining if self._started else min(remaining, self._idle_timeout_s))
        if self._started:
            self.expired = (
                f"the stream was idle: nothing from the client for {limit:g} s (no frames sent, no audio "
                "read) before it finished; the codec worker's --idle-timeout ended it"
            )
        else:
            self.expired = (
                f"no DecodeStart within {limit:g} s of opening the stream; the codec worker's "
                "--start-timeout ended it"
            )
        self._handler.cancel()
