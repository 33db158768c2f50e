"""The codec worker gives freed memory back after streams end (see services/codec_worker/memory.py)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from services.codec_worker.memory import HeapTrimmer, _malloc_trim, resident_bytes, should_trim

MB = 1024 * 1024


@pytest.mark.parametrize("left, rss, expected", [
    (0, 100 * MB, True),  # idle: give everything back
    (3, 120 * MB, False),  # streams open and the heap holds steady: leave it
    (3, 400 * MB, True),  # streams open and the heap grew past the margin
    (3, None, True),  # RSS unknown: trim as if idle
])
def test_when_to_trim(left, rss, expected):
    assert should_trim(left, rss, baseline=100 * MB, growth_bytes=256 * MB) is expected


def test_trimmer_trims_once_the_last_stream_ended():
    trimmed = threading.Event()

    def trim(pad: int) -> int:
        assert pad == 0
        trimmed.set()
        return 1

    trimmer = HeapTrimmer(interval_s=0.0, trim=trim, rss=lambda: 100 * MB)
    trimmer.start()
    try:
        trimmer.stream_ended(0)
        assert trimmed.wait(30), "no trim after the last stream ended"
    finally:
        trimmer.stop()
    assert trimmer.trims >= 1


def test_a_trim_that_fails_does_not_stop_the_trimmer():
    calls = []

    def trim(pad: int) -> int:
        calls.append(pad)
        if len(calls) == 1:
            raise OSError("no")
        return 1

    trimmer = HeapTrimmer(interval_s=0.0, trim=trim, rss=lambda: None)
    trimmer.start()
    try:
        for _ in range(2000):
            trimmer.stream_ended(0)
            if len(calls) >= 2:
                break
            threading.Event().wait(0.01)
    finally:
        trimmer.stop()
    assert len(calls) >= 2


def test_rss_is_read_from_proc():
    rss = resident_bytes()
    assert rss is None or rss > 10 * MB


@pytest.mark.skipif(_malloc_trim() is None, reason="the C library has no malloc_trim (not glibc)")
def test_codec_worker_trims_after_its_streams_end(snac_dir):
    from test_codec_server import codec_worker, decode, good_requests

    async def scenario():
        async with codec_worker(snac_dir) as (running, stub, _):
            await asyncio.gather(*(decode(stub, good_requests(6, first=i)) for i in range(3)))
            trimmer = running.components["trimmer"]
            for _ in range(3000):  # a bound on the wait, not a measurement
                if trimmer.trims:
                    break
                await asyncio.sleep(0.01)
            return trimmer.trims

    assert asyncio.run(scenario()) >= 1
