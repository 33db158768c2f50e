"""What a client asked for, in Chorus's terms: plain values every door builds (through
validation) and the synthesis and pipeline execute.

Kept below the pipeline and the doors, so that a door can describe a request without
importing the machinery that runs it, and the pipeline can run one without knowing
which door it came through.
"""

from __future__ import annotations

from dataclasses import dataclass

from chorus.proto.tts.v1 import common_pb2
from chorus.realtime.playback import DEFAULT_START_BUFFER_S
from chorus.speech.audio_formats import AudioFormat
from chorus.speech.family import ORPHEUS


@dataclass(frozen=True)
class GenerationSpec:
    """What every piece of one request shares."""

    request_id: str
    voice: str
    sampling: common_pb2.SamplingParams | None = None
    # The model family of the voice: only token servers of that family may speak it.
    family: str = ORPHEUS


@dataclass(frozen=True)
class SynthesisOptions:
    spec: GenerationSpec
    format: AudioFormat
    sample_rate: int
    # Seconds the whole call may take (the client's deadline, or the gateway's default).
    timeout_s: float
    # Audio the listener buffers before playback starts (the playback clock).
    start_buffer_s: float = DEFAULT_START_BUFFER_S
    # Playback speed by time-stretching (the OpenAI endpoint's `speed`); 1 keeps the audio as generated.
    tempo: float = 1.0
