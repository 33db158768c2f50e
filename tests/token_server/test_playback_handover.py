"""The playback clock's handover from the event loop to the token engine's thread: the
loop advances its own clock and posts the engine a copy with the request's commands,
only when the start of playback (all that pacing reads) moves. No engine thread here."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from chorus.realtime.playback import PlaybackClock
from chorus.speech import orpheus
from services.token_server.engine import RequestHandle, _Playback
from services.token_server.request import GenerationRequest
from services.token_server.sampler import SamplingParams

RATE = orpheus.SAMPLE_RATE


def handle_posting_to(posted: list) -> RequestHandle:
    engine = SimpleNamespace(_bridge=SimpleNamespace(post_if_alive=posted.append))
    request = GenerationRequest("r", [1, 2, 3], SamplingParams(seed=0), token_budget=70,
                                playback=PlaybackClock(RATE, start_buffer_s=0.1))
    return RequestHandle(engine, request, loop=None, now=0.0)


def test_the_engine_gets_its_own_copy_and_a_new_one_only_when_playback_start_moves():
    posted: list = []
    handle = handle_posting_to(posted)
    at_submit = handle.engine_clock()
    assert at_submit is not handle.clock and not at_submit.started

    handle.deliver(RATE, 10.0)  # the first audio starts playback at 10.1
    assert len(posted) == 1 and isinstance(posted[0], _Playback) and posted[0].handle is handle
    assert posted[0].clock is not handle.clock and posted[0].clock.start_at == 10.1
    assert not at_submit.started  # what the engine held is never written by the loop

    handle.deliver(RATE, 10.5)  # on time: the start stays, nothing to hand over
    assert len(posted) == 1

    handle.deliver(RATE, 12.6)  # due at 12.1: a 0.5 s stall shifts playback
    assert len(posted) == 2 and posted[1].clock.start_at == pytest.approx(10.6)
    assert posted[0].clock.start_at == 10.1  # an earlier copy stays as it was handed over


def test_a_cancelled_request_hands_nothing_over():
    posted: list = []
    handle = handle_posting_to(posted)
    handle.cancel()
    cancels = len(posted)
    handle.deliver(RATE, 1.0)
    assert len(posted) == cancels and not any(isinstance(c, _Playback) for c in posted)
