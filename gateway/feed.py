"""Text arriving on one side, pieces taken on the other: the segmenter made awaitable.

The reader of a StreamingSynthesize call pushes text as it comes; the pipeline
awaits the next piece when it has room for another generation. For Synthesize the
whole text is pushed and ended up front, so both calls share one pipeline.
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
        self._changed = asyncio.Event()
        self._error: BaseException | None = None

    @classmethod
    def of_text(cls, text: str, segmenter: Segmenter) -> TextFeed:
        feed = cls(segmenter)
        feed.push(text)
        feed.end()
        return feed

    def push(self, text: str) -> None:
        self._segmenter.push(text)
        self._changed.set()

    def flush(self) -> None:
        self._segmenter.flush()
        self._changed.set()

    def end(self) -> None:
        self._segmenter.end()
        self._changed.set()

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
            if self._error is not None:
                raise self._error
            piece = self._segmenter.take(single_sentence=first)
            if piece is not None:
                return piece
            if self._segmenter.done:
                return None
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise GatewayError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    "the request's deadline passed while waiting for more text: send `end` (or close the "
                    "stream) once the text is complete, and set a deadline that covers the whole text",
                ) from None
