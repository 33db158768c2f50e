from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_tokens", "seed", "ignore_end_of_speech")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    IGNORE_END_OF_SPEECH_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repetition_penalty: float
    max_tokens: int
    seed: int
    ignore_end_of_speech: bool
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., min_p: _Optional[float] = ..., repetition_penalty: _Optional[float] = ..., max_tokens: _Optional[int] = ..., seed: _Optional[int] = ..., ignore_end_of_speech: _Optional[bool] = ...) -> None: ...

class PlaybackClock(_message.Message):
    __slots__ = ("first_sample_due_in_s", "start_buffer_s")
    FIRST_SAMPLE_DUE_IN_S_FIELD_NUMBER: _ClassVar[int]
    START_BUFFER_S_FIELD_NUMBER: _ClassVar[int]
    first_sample_due_in_s: float
    start_buffer_s: float
    def __init__(self, first_sample_due_in_s: _Optional[float] = ..., start_buffer_s: _Optional[float] = ...) -> None: ...

class CodeFrames(_message.Message):
    __slots__ = ("first_frame_index", "codes")
    FIRST_FRAME_INDEX_FIELD_NUMBER: _ClassVar[int]
    CODES_FIELD_NUMBER: _ClassVar[int]
    first_frame_index: int
    codes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, first_frame_index: _Optional[int] = ..., codes: _Optional[_Iterable[int]] = ...) -> None: ...

class PcmChunk(_message.Message):
    __slots__ = ("sample_offset", "pcm", "sample_rate_hz")
    SAMPLE_OFFSET_FIELD_NUMBER: _ClassVar[int]
    PCM_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_HZ_FIELD_NUMBER: _ClassVar[int]
    sample_offset: int
    pcm: bytes
    sample_rate_hz: int
    def __init__(self, sample_offset: _Optional[int] = ..., pcm: _Optional[bytes] = ..., sample_rate_hz: _Optional[int] = ...) -> None: ...

class SynthesisSummary(_message.Message):
    __slots__ = ("request_id", "trace_id", "tokens", "frames", "audio_seconds", "time_to_first_token_ms", "time_to_first_audio_ms", "real_time_factor", "queue_wait_ms", "prompt_tokens", "finish_reason", "time_to_decodable_frames_ms", "seed", "underruns", "stall_seconds")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    AUDIO_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_MS_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_AUDIO_MS_FIELD_NUMBER: _ClassVar[int]
    REAL_TIME_FACTOR_FIELD_NUMBER: _ClassVar[int]
    QUEUE_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_DECODABLE_FRAMES_MS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    UNDERRUNS_FIELD_NUMBER: _ClassVar[int]
    STALL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    trace_id: str
    tokens: int
    frames: int
    audio_seconds: float
    time_to_first_token_ms: float
    time_to_first_audio_ms: float
    real_time_factor: float
    queue_wait_ms: float
    prompt_tokens: int
    finish_reason: str
    time_to_decodable_frames_ms: float
    seed: int
    underruns: int
    stall_seconds: float
    def __init__(self, request_id: _Optional[str] = ..., trace_id: _Optional[str] = ..., tokens: _Optional[int] = ..., frames: _Optional[int] = ..., audio_seconds: _Optional[float] = ..., time_to_first_token_ms: _Optional[float] = ..., time_to_first_audio_ms: _Optional[float] = ..., real_time_factor: _Optional[float] = ..., queue_wait_ms: _Optional[float] = ..., prompt_tokens: _Optional[int] = ..., finish_reason: _Optional[str] = ..., time_to_decodable_frames_ms: _Optional[float] = ..., seed: _Optional[int] = ..., underruns: _Optional[int] = ..., stall_seconds: _Optional[float] = ...) -> None: ...

class ReferenceAudio(_message.Message):
    __slots__ = ("samples", "sample_rate_hz")
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_HZ_FIELD_NUMBER: _ClassVar[int]
    samples: _containers.RepeatedScalarFieldContainer[float]
    sample_rate_hz: int
    def __init__(self, samples: _Optional[_Iterable[float]] = ..., sample_rate_hz: _Optional[int] = ...) -> None: ...

class ReferenceCodes(_message.Message):
    __slots__ = ("codec", "codes")
    CODEC_FIELD_NUMBER: _ClassVar[int]
    CODES_FIELD_NUMBER: _ClassVar[int]
    codec: str
    codes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, codec: _Optional[str] = ..., codes: _Optional[_Iterable[int]] = ...) -> None: ...
