"""The audio codecs Chorus decodes, by the names the wire uses for them.

A token server writes the codes of one codec (its model family's) and may open a
decode stream only on a codec worker that loads that codec: frames of another codec
would decode to noise, or not at all. Workers list what they load in
`GetLoadResponse.codecs`; a stream names its codec in `DecodeStart.codec`. Both fields
came after the first codec, so an empty one means that codec: a worker or token server
from before them keeps working with one from after.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

# SNAC at 24 kHz: 7 codes a frame (Orpheus's layout, chorus.speech.orpheus).
SNAC_24KHZ = "snac_24khz"
# NeuCodec at 24 kHz: 1 code a frame, 50 frames a second (NeuTTS-Air, chorus.speech.neutts).
NEUCODEC_24KHZ = "neucodec_24khz"
# What an empty field means: the only codec before the fields existed.
UNNAMED = SNAC_24KHZ


def check_frames(codes: Sequence[int] | np.ndarray, first_frame_index: int, codes_per_frame: int,
                 codebook_size: int) -> np.ndarray:
    """A flat run of codes as (n, codes_per_frame) int64; ValueError naming the first
    bad frame, so that callers can report it."""
    flat = np.asarray(codes, dtype=np.int64)
    if flat.size == 0 or flat.size % codes_per_frame:
        raise ValueError(
            f"frame {first_frame_index}: got {flat.size} codes, expected a non-zero multiple of {codes_per_frame}"
        )
    frames = flat.reshape(-1, codes_per_frame)
    bad = np.nonzero(((frames < 0) | (frames >= codebook_size)).any(axis=1))[0]
    if bad.size:
        row = int(bad[0])
        value = int(frames[row][(frames[row] < 0) | (frames[row] >= codebook_size)][0])
        raise ValueError(f"frame {first_frame_index + row}: code {value} outside 0..{codebook_size - 1}")
    return frames


def declared(codecs: Iterable[str]) -> frozenset[str]:
    """The codecs a worker decodes, from its GetLoadResponse.codecs."""
    return frozenset(codecs) or frozenset({UNNAMED})


def requested(codec: str) -> str:
    """The codec a stream carries, from its DecodeStart.codec."""
    return codec or UNNAMED
