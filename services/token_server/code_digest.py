"""A running digest of a stream's code frames (tts.v1.CodeDigest).

When a token server dies mid-stream, the gateway replays the request on another with
the same seed and continues from the last sample it relayed. That is only right if
the replay regenerates the very codes whose audio was relayed; a different model
file, or kernels that round differently on another machine, would not. Eight bytes
with each audio chunk let the gateway check that without the codes on the wire.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

from chorus.proto.tts.v1 import token_server_pb2


class CodeDigest:
    def __init__(self) -> None:
        self.frames = 0
        self.state = 0

    def update(self, codes: Sequence[int]) -> None:
        """Chains one frame: its codes (each 0..65535) as 16-bit words. Unsigned, so
        that NeuCodec's codes above 32767 fit; Orpheus's (0..4095) give the bytes they
        gave as signed words, so digests agree across versions."""
        data = self.state.to_bytes(8, "little") + np.asarray(codes, dtype="<u2").tobytes()
        self.state = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")
        self.frames += 1

    def message(self) -> token_server_pb2.CodeDigest:
        return token_server_pb2.CodeDigest(frames=self.frames, digest=self.state)
