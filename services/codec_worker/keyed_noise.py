"""Gaussian noise that is a pure function of (seed, layer, absolute position).

SNAC's NoiseBlocks draw `randn` from a generator, so the audio depends on the
generator's call history: on how a stream was chunked into steps, on which streams
shared a step, and on the worker. A stream resumed on another worker after a
failover would hear different noise from the resume point on. Keying every value by
where it sits makes noise part of the request instead: the same seed gives the same
audio on any worker, in any batch, across a resume.

Each value comes from splitmix64 (a counter-based generator: output i is a bijective
mix of key + i * gamma) and only integer arithmetic and one IEEE multiply, so it is
bit-identical on every machine; a transcendental step (Box-Muller's log and cos)
would not be, since libm and SIMD implementations differ in the last bit. The
Gaussian is Irwin-Hall: the sum of 8 uniform 16-bit fields, centred and scaled to
unit variance (excess kurtosis -0.15, support +-4.9 sigma), which the decoder's noise
layers cannot tell from `randn` at audio scale.
"""

from __future__ import annotations

import math

import numpy as np

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_FIELD = np.uint64(0xFFFF)
_WORDS_PER_VALUE = 2  # 64-bit words, four 16-bit fields each
_FIELDS = 4 * _WORDS_PER_VALUE
# sum of n uniform fields on 0..65535 has mean n * 65535 / 2 and variance
# n * (65536^2 - 1) / 12; the integer 2 * sum - n * 65535 is centred and exact.
_CENTRE = _FIELDS * 65535
_SCALE = np.float32(1.0 / (2.0 * math.sqrt(_FIELDS * (65536.0**2 - 1.0) / 12.0)))


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijection of uint64 with full avalanche."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def layer_keys(seeds: np.ndarray, layer: int) -> np.ndarray:
    """One key per (seed, noise layer): the start of that layer's own stream."""
    seeds = np.asarray(seeds, dtype=np.uint64)
    layer_word = np.full_like(seeds, layer + 1) * _GAMMA
    return _mix(_mix(seeds + _GAMMA) ^ layer_word)


def gaussian(keys: np.ndarray, first_positions: np.ndarray, count: int) -> np.ndarray:
    """float32 (len(keys), count): row b holds the values at positions
    first_positions[b] .. first_positions[b] + count - 1 of key b's stream."""
    keys = np.asarray(keys, dtype=np.uint64)[:, None]
    positions = np.asarray(first_positions, dtype=np.int64)[:, None] + np.arange(count, dtype=np.int64)
    if (positions < 0).any():
        raise ValueError("noise positions must be >= 0")
    counters = positions.astype(np.uint64) * np.uint64(_WORDS_PER_VALUE)
    total = np.zeros(positions.shape, dtype=np.int64)
    for word in range(_WORDS_PER_VALUE):
        z = _mix(keys + (counters + np.uint64(word)) * _GAMMA)
        for shift in (0, 16, 32, 48):
            total += ((z >> np.uint64(shift)) & _FIELD).astype(np.int64)
    # |2 * total - centre| < 2^24, so the float32 conversion is exact and the only
    # rounding is one correctly rounded multiply.
    return (2 * total - _CENTRE).astype(np.float32) * _SCALE
