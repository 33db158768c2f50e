"""Text arriving on one side, pieces taken on the other: the segmenter made awaitable.

The reader of a streaming call pushes text as it comes; the pipeline awaits the next
piece when it has room for another generation. For a whole text the text is pushed
and ended up front, so every call shares one pipeline.

Segmenting is CPU work that grows with the text (pysbd is pure Python), and a text
may be 20,000 characters: it runs on a worker thread, never on the event loop, so
one client's long text cannot stall every other call of the gateway. A lock keeps
the segmenter to one thread at a time, and keeps a stream's pushes in order.
"""

from __future__ import annotations

import asyncio
import time

import grpc

from gateway.errors import GatewayError
from gateway.segmenter import Segmenter


class TextFeed:
    def __init__(self, segmenter: Segmenter) -> None:
        self._segmenter = segmenter
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._error: BaseException | None = None

    @classmethod
    async def of_text(cls, text: str, segmenter: Segmenter) -> TextFeed:
        feed = cls(segmenter)
        await feed.push(text)
        await feed.end()
        return feed

    async def push(self, text: str) -> None:
        await self._off_loop(self._segmenter.push, text)

    async def flush(self) -> None:
        await self._off_loop(self._segmenter.flush)

    async def end(self) -> None:
        await self._off_loop(self._segmenter.end)

    def fail(self, error: BaseException) -> None:
        """The input side broke (bad message, client gone): the pipeline raises `error`."""
        self._error = error
        self._changed.set()

    @property
    def waiting_chars(self) -> int:
        """Text received but not yet taken to be spoken."""
        return self._segmenter.buffered_chars

    async def next_piece(self, first: bool, deadline: float) -> str | None:
        """The next piece to speak, waiting for text if none is ready; None at the end.

        A client that keeps its stream open and sends nothing would otherwise hold the
        call forever: past `deadline` (time.monotonic()) the wait ends in DEADLINE_EXCEEDED.
        """
        while True:
            self._changed.clear()
            if self._error is not None:
                raise self._error
            async with self._lock:
                piece = self._segmenter.take(single_sentence=first)
                done = self._segmenter.done
            if piece is not None:
                return piece
            if done:
                return None
            try:
                await asyncio.wait_for(self._changed.wait(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise GatewayError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    "the request's deadline passed while waiting for more text: send `end` (or close the "
                    "stream) once the text is complete, and set a deadline that covers the whole text",
                ) from None

    async def _off_loop(self, method, *args) -> None:
        async with self._lock:
            work = asyncio.get_running_loop().run_in_executor(None, method, *args)
            try:
                await asyncio.shield(work)
            finally:
                if not work.done():
                    # Cancelled mid-call: the lock stays held until the thread is
                    # done with the segmenter.
                    await asyncio.wait({work})
        self._changed.set()
