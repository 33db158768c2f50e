from chorus.proto.tts.v1 import common_pb2 as _common_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EncodeReferenceRequest(_message.Message):
    __slots__ = ("request_id", "audio")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    audio: _common_pb2.ReferenceAudio
    def __init__(self, request_id: _Optional[str] = ..., audio: _Optional[_Union[_common_pb2.ReferenceAudio, _Mapping]] = ...) -> None: ...

class EncodeReferenceResponse(_message.Message):
    __slots__ = ("codes",)
    CODES_FIELD_NUMBER: _ClassVar[int]
    codes: _common_pb2.ReferenceCodes
    def __init__(self, codes: _Optional[_Union[_common_pb2.ReferenceCodes, _Mapping]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "text", "voice", "sampling", "codes_only", "deterministic_audio", "playback", "resume_from_sample", "verify_frames")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    VOICE_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    CODES_ONLY_FIELD_NUMBER: _ClassVar[int]
    DETERMINISTIC_AUDIO_FIELD_NUMBER: _ClassVar[int]
    PLAYBACK_FIELD_NUMBER: _ClassVar[int]
    RESUME_FROM_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    VERIFY_FRAMES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    text: str
    voice: str
    sampling: _common_pb2.SamplingParams
    codes_only: bool
    deterministic_audio: bool
    playback: _common_pb2.PlaybackClock
    resume_from_sample: int
    verify_frames: int
    def __init__(self, request_id: _Optional[str] = ..., text: _Optional[str] = ..., voice: _Optional[str] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., codes_only: _Optional[bool] = ..., deterministic_audio: _Optional[bool] = ..., playback: _Optional[_Union[_common_pb2.PlaybackClock, _Mapping]] = ..., resume_from_sample: _Optional[int] = ..., verify_frames: _Optional[int] = ...) -> None: ...

class CodeDigest(_message.Message):
    __slots__ = ("frames", "digest")
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    frames: int
    digest: int
    def __init__(self, frames: _Optional[int] = ..., digest: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("audio", "frames", "summary", "codes")
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    CODES_FIELD_NUMBER: _ClassVar[int]
    audio: _common_pb2.PcmChunk
    frames: _common_pb2.CodeFrames
    summary: _common_pb2.SynthesisSummary
    codes: CodeDigest
    def __init__(self, audio: _Optional[_Union[_common_pb2.PcmChunk, _Mapping]] = ..., frames: _Optional[_Union[_common_pb2.CodeFrames, _Mapping]] = ..., summary: _Optional[_Union[_common_pb2.SynthesisSummary, _Mapping]] = ..., codes: _Optional[_Union[CodeDigest, _Mapping]] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("slots_total", "slots_busy", "queue_depth", "queue_capacity", "model", "capacity_streams", "active_streams", "family")
    SLOTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    SLOTS_BUSY_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    QUEUE_CAPACITY_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_STREAMS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_STREAMS_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    slots_total: int
    slots_busy: int
    queue_depth: int
    queue_capacity: int
    model: str
    capacity_streams: int
    active_streams: int
    family: str
    def __init__(self, slots_total: _Optional[int] = ..., slots_busy: _Optional[int] = ..., queue_depth: _Optional[int] = ..., queue_capacity: _Optional[int] = ..., model: _Optional[str] = ..., capacity_streams: _Optional[int] = ..., active_streams: _Optional[int] = ..., family: _Optional[str] = ...) -> None: ...
