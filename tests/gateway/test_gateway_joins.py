"""Click-free joins: faded edges, untouched middles, no sample gained or lost."""

from __future__ import annotations

import numpy as np

from gateway.joins import FADE_SAMPLES, JoinSmoother


def relay(smoother: JoinSmoother, pieces: list[list[np.ndarray]]) -> np.ndarray:
    out = []
    for chunks in pieces:
        smoother.start_piece()
        out += [smoother.feed(c) for c in chunks]
        out.append(smoother.end_piece())
    return np.concatenate(out)


def test_pieces_keep_their_length_and_middles_with_faded_edges():
    a = [np.full(1000, 8000, np.int16), np.full(37, 8000, np.int16), np.full(3, 8000, np.int16)]
    b = [np.full(50, -8000, np.int16), np.full(2000, -8000, np.int16)]
    out = relay(JoinSmoother(), [a, b])
    assert out.size == 1040 + 2050
    assert (out[FADE_SAMPLES : 1040 - FADE_SAMPLES] == 8000).all()
    assert (out[1040 + FADE_SAMPLES : -FADE_SAMPLES] == -8000).all()
    # At the join the signal passes near zero instead of stepping by 16000.
    assert abs(int(out[1039])) < 100 and abs(int(out[1040])) < 100
    assert np.abs(np.diff(out.astype(np.int32))).max() < 16000 / 10


def test_a_piece_shorter_than_the_fade_is_faded_both_ways():
    out = relay(JoinSmoother(), [[np.full(10, 1000, np.int16)]])
    assert out.size == 10
    assert (np.abs(out) < 1000).all()


def test_nothing_is_held_after_a_piece_ends():
    smoother = JoinSmoother()
    smoother.start_piece()
    released = smoother.feed(np.ones(500, np.int16))
    assert released.size == 500 - FADE_SAMPLES
    assert smoother.end_piece().size == FADE_SAMPLES
    assert smoother.end_piece().size == 0
